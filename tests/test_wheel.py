"""The CPU wheel (`make wheel`, local version +cpu) installs into a fresh virtual environment and its op runs there.

The fresh venv sees the build venv's torch through a .pth line naming that site-packages directory (a path line
is added to sys.path without processing the .pth files inside it, so the repository's editable install stays
invisible); the test proves the isolation by checking that fop_kernels and its _C extension load from the fresh
venv, not from the source tree. The wheel in dist/ is used when it is newer than every native source and
setup.py (`make wheel`); otherwise one is built (the slow part: compiling csrc/*.cpp unless build/ has the
objects of an in-place build). Marked slow: on 2 cores the build alone takes minutes.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources_mtime() -> float:
    paths = glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True)
    paths += glob.glob(os.path.join(ROOT, "fop_kernels", "**", "*.py"), recursive=True)
    paths += [os.path.join(ROOT, "setup.py")]
    return max(os.path.getmtime(p) for p in paths)


def _cpu_wheel(tmp_path) -> str:
    wheels = sorted(glob.glob(os.path.join(ROOT, "dist", "fop_kernels-*+cpu-*.whl")), key=os.path.getmtime)
    if wheels and os.path.getmtime(wheels[-1]) > _sources_mtime():
        return wheels[-1]
    # build/ is shared with `setup.py build_ext --inplace` (ninja reuses its objects), under the same lock
    env = dict(os.environ, FOP_KERNELS_FORCE_CPU="1", MAX_JOBS="2")
    cmd = [sys.executable, "setup.py", "-q", "bdist_wheel", "--bdist-dir", str(tmp_path / "bdist"),
           "--dist-dir", str(tmp_path / "dist")]
    if shutil.which("flock"):
        cmd = ["flock", "/tmp/fop_build.lock", *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "fop_kernels-*+cpu-*.whl"))
    return wheel


@pytest.mark.slow
def test_cpu_wheel_installs_into_fresh_venv_and_runs(tmp_path):
    """Slow: building the wheel compiles every csrc/*.cpp unless build/ already holds their objects."""
    wheel = _cpu_wheel(tmp_path)
    assert "+cpu-" in os.path.basename(wheel)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = str(venv / "bin" / "python")
    venv_site = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(venv_site, "build_venv_torch.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    # pip of the build venv installs into the fresh one: --prefix keeps the files out of the build venv, and
    # --ignore-installed stops pip from first uninstalling the build venv's own (editable) fop-kernels.
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet",
                    "--ignore-installed", "--prefix", str(venv), wheel], check=True)
    script = textwrap.dedent(f"""
        import os, torch, fop_kernels
        from fop_kernels import _native
        site = {venv_site!r}
        assert fop_kernels.__file__.startswith(site), fop_kernels.__file__
        import fop_kernels._C as ext
        assert ext.__file__.startswith(site), ext.__file__
        assert _native.loaded(), _native.load_error()
        mats = [torch.eye(3) * 2.0, torch.diag(torch.tensor([1.0, 4.0]))]
        evals, evecs = fop_kernels.eigh(mats)
        assert fop_kernels.resolve("eigh", "cpu")[0] == "cpp"
        assert torch.allclose(evals[0], torch.full((3,), 2.0)) and torch.allclose(evals[1], torch.tensor([1.0, 4.0]))
        inv = fop_kernels.damped_inverse(mats, 0.0)
        assert torch.allclose(inv[1], torch.diag(torch.tensor([1.0, 0.25])))
        print("ok", fop_kernels.__file__)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run([vpy, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("ok")
    listed = subprocess.run([sys.executable, "-m", "pip", "list", "--path", venv_site, "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout
    assert any(line.startswith("fop-kernels==") and line.endswith("+cpu") for line in listed.splitlines()), listed
    still = subprocess.run([sys.executable, "-c", "import fop, fop_kernels"], cwd=tmp_path, env=env)
    assert still.returncode == 0, "installing the wheel elsewhere removed the build venv's own fop-kernels"
