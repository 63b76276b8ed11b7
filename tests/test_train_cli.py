"""fop-train end to end on tiny generated IDX datasets, the IDX reader, long-tailed sampling, clear errors."""

import gzip
import json
import math
import os
import re
import struct

import numpy as np
import pytest
import torch
from fop_train import cli as train
from fop_train.data import (
    MNIST_FILES,
    ImageDataset,
    load_dataset,
    load_digits,
    load_mnist,
    long_tailed,
    long_tailed_counts,
    read_idx,
    write_idx,
)
from fop_train.models import MODELS, SEQUENCE_MODELS, build_model
from fop_train.report import PLOT_DPI, PLOT_PANEL_INCHES, markdown_table, summarize

MNIST_DIR = os.environ.get("FOP_MNIST_DIR", "")  # a folder with the four MNIST IDX files, to test the real data


def _make_idx_dataset(directory, n_train=96, n_test=48, side=8, classes=4, dotted=False, gz=True, seed=0):
    """Write a learnable 4-class IDX dataset: each class lights one quadrant of the image (plus noise)."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)

    def images(n):
        y = np.arange(n) % classes
        rng.shuffle(y)
        x = rng.integers(0, 60, size=(n, side, side)).astype(np.uint8)
        h = side // 2
        for i, c in enumerate(y):
            r, col = divmod(int(c), 2)
            x[i, r * h:(r + 1) * h, col * h:(col + 1) * h] += 180
        return x, y.astype(np.uint8)

    x_tr, y_tr = images(n_train)
    x_te, y_te = images(n_test)
    for role, arr in (("train_images", x_tr), ("train_labels", y_tr), ("test_images", x_te), ("test_labels", y_te)):
        stem = MNIST_FILES[role]
        if dotted:
            stem = stem.replace("-idx", ".idx")
        write_idx(os.path.join(directory, stem + (".gz" if gz else "")), arr)
    return x_tr, y_tr, x_te, y_te


# ---------------------------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, dtype, gz):
    arr = (np.arange(2 * 3 * 5) % 100).astype(dtype).reshape(2, 3, 5)
    path = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
    write_idx(path, arr)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out, arr)


def test_idx_reader_parses_hand_written_header(tmp_path):
    # magic 0x00000803 (ubyte, 3 dims), dims 2 x 2 x 3 big-endian, then 12 bytes of data
    payload = struct.pack(">BBBB3i", 0, 0, 0x08, 3, 2, 2, 3) + bytes(range(12))
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(payload)
    np.testing.assert_array_equal(read_idx(str(path)), np.arange(12, dtype=np.uint8).reshape(2, 2, 3))


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">i", 3) + b"abc", "not an IDX file"),
        (b"\x00\x00\x07\x01" + struct.pack(">i", 3) + b"abc", "unknown IDX type code 0x07"),
        (b"\x00\x00\x08\x02" + struct.pack(">i", 3), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">i", 4) + b"abc", "need 4 data bytes, the file has 3"),
    ],
)
def test_idx_reader_rejects_bad_files(tmp_path, payload, message):
    path = tmp_path / "bad.idx"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=message):
        read_idx(str(path))


@pytest.mark.parametrize("dotted, gz", [(False, True), (True, True), (False, False)])
def test_load_mnist_layout_from_generated_files(tmp_path, dotted, gz):
    x_tr, y_tr, x_te, y_te = _make_idx_dataset(str(tmp_path), dotted=dotted, gz=gz)
    data = load_mnist(str(tmp_path))
    assert data.train_x.shape == (96, 1, 8, 8) and data.test_x.shape == (48, 1, 8, 8)
    assert data.num_classes == 4
    assert torch.equal(data.train_y, torch.from_numpy(y_tr.astype(np.int64)))
    assert torch.equal(data.test_y, torch.from_numpy(y_te.astype(np.int64)))
    # standardized with the training statistics of pixel / 255
    raw = torch.from_numpy(x_tr).float() / 255
    expected = (raw - raw.mean()) / raw.std()
    torch.testing.assert_close(data.train_x[:, 0], expected, rtol=1e-5, atol=1e-5)
    assert abs(float(data.train_x.mean())) < 1e-5


def test_missing_data_dir_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*train-images-idx3-ubyte"):
        load_mnist(str(tmp_path / "nowhere"))
    _make_idx_dataset(str(tmp_path))
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte; expected the four IDX files"):
        load_mnist(str(tmp_path))


def test_mismatched_image_and_label_counts(tmp_path):
    _make_idx_dataset(str(tmp_path))
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="96 images but .* 5 labels"):
        load_mnist(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason="set FOP_MNIST_DIR to a folder with the MNIST IDX files")
def test_real_mnist_files_when_present():
    data = load_mnist(MNIST_DIR)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert data.num_classes == 10
    assert sorted(set(data.train_y.tolist())) == list(range(10))


# ---------------------------------------------------------------------------------------------- long tail


def test_long_tailed_counts_follow_exponential_decay():
    counts = long_tailed_counts(500, 10, 100.0)
    assert counts[0] == 500 and counts[-1] == 5
    expected = [int(500 * 100.0 ** (-c / 9)) for c in range(10)]
    assert counts == expected
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert long_tailed_counts(7, 3, 1.0) == [7, 7, 7]
    with pytest.raises(ValueError, match="imbalance must be >= 1"):
        long_tailed_counts(10, 3, 0.5)


def test_long_tailed_sampling_gives_requested_class_counts():
    data = load_digits()
    lt = long_tailed(data, 10.0, seed=3)
    n_max = min(data.class_counts())
    assert lt.class_counts() == long_tailed_counts(n_max, 10, 10.0)
    assert lt.class_counts()[0] == n_max and lt.class_counts()[-1] == int(n_max / 10)
    assert torch.equal(lt.test_y, data.test_y)  # the test set stays balanced
    # every kept sample is a real training sample with its own label
    rows = {tuple(x.flatten().tolist()): int(y) for x, y in zip(data.train_x, data.train_y)}
    assert all(rows[tuple(x.flatten().tolist())] == int(y) for x, y in zip(lt.train_x, lt.train_y))
    # the choice depends on the seed, the counts do not
    other = long_tailed(data, 10.0, seed=4)
    assert other.class_counts() == lt.class_counts() and not torch.equal(other.train_x, lt.train_x)


def test_long_tailed_explicit_n_max_too_large():
    data = ImageDataset("toy", torch.zeros(6, 1, 2, 2), torch.tensor([0, 0, 0, 1, 1, 2]), torch.zeros(1, 1, 2, 2),
                        torch.zeros(1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="class 0 needs 5, has 3"):
        long_tailed(data, 2.0, n_max=5)


def test_load_dataset_errors_and_limit():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; valid: digits, mnist"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="needs --data-dir"):
        load_dataset("mnist")
    small = load_dataset("digits", train_limit=100, seed=1)
    assert len(small.train_y) == 100


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", [m for m in MODELS if m not in SEQUENCE_MODELS])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_models_forward_backward(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, 10)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_contents():
    vit = build_model("transformer", (1, 8, 8), 10)
    kinds = {type(m).__name__ for m in vit.modules()}
    assert {"Conv2d", "LayerNorm", "Linear"} <= kinds and "MultiheadAttention" not in kinds
    assert "BatchNorm2d" in {type(m).__name__ for m in build_model("resnet", (1, 8, 8), 10).modules()}
    with pytest.raises(ValueError, match="unknown model 'vgg'; valid: cnn, mlp, resnet, transformer, encoder, gpt"):
        build_model("vgg", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="does not fit inputs of shape"):
        build_model("gpt", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="does not fit inputs of shape"):
        build_model("cnn", (32,), 256)


def test_text_dataset_and_gpt_are_causal():
    data = load_dataset("text")
    assert data.train_x.dtype == torch.long and data.train_x.shape[1] == 32 and data.num_classes == 256
    assert torch.equal(data.train_x[:, 1:], data.train_y[:, :-1])  # y is x shifted by one byte
    assert torch.equal(data.train_x[1:, 0], data.train_y[:-1, -1])  # windows are consecutive in the stream
    assert len(data.test_y) > 0 and int(data.train_x.max()) < 256
    torch.manual_seed(0)
    gpt = build_model("gpt", data.image_shape, 256, width=16)
    x = data.train_x[:2].clone()
    out = gpt(x)
    assert out.shape == (2, 32, 256)
    x[:, 20:] = (x[:, 20:] + 1) % 256  # later tokens never change earlier outputs
    assert torch.allclose(gpt(x)[:, :20], out[:, :20], atol=1e-6)
    with pytest.raises(ValueError, match="imbalance"):
        load_dataset("text", imbalance=10)


def test_cli_trains_the_gpt_on_text(tmp_path):
    out = tmp_path / "gpt"
    rc = train.main(["--data", "text", "--model", "gpt", "--width", "16", "--train-limit", "512", "--epochs", "2",
                     "--batch-sizes", "128", "--optimizers", "kfac,fop", "--seeds", "0", "--target", "99",
                     "--quiet", "--out", str(out)])
    assert rc == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["optimizer"] for r in runs] == ["kfac", "fop"]
    for run in runs:
        assert not run["diverged"]
        first, last = run["history"][0], run["history"][-1]
        # 8 steps at the defaults: next-byte accuracy from chance (~0.4%) to the frequent bytes' share (~30%)
        assert last["test_acc"] > run["initial_acc"] + 10, run["optimizer"]
        assert math.isfinite(last["train_loss"]) and last["train_loss"] <= first["train_loss"]


# ---------------------------------------------------------------------------------------------- schedule, report


def test_lr_schedule():
    assert train.scaled_lr(0.1, 1024, 256, "linear") == pytest.approx(0.4)
    assert train.scaled_lr(0.1, 1024, 256, "sqrt") == pytest.approx(0.2)
    assert train.scaled_lr(0.1, 1024, 256, "none") == pytest.approx(0.1)
    assert [train.lr_factor(s, 10, 2, "cosine") for s in (0, 1)] == [0.5, 1.0]
    assert train.lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert train.lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert [train.lr_factor(s, 8, 0, "step") for s in (0, 3, 4, 5, 6, 7)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="unknown schedule"):
        train.lr_factor(5, 10, 2, "poly")


def _run(opt, batch, seed, reached, accs):
    hist = [{"epoch": i + 1, "seconds": 0.5 * (i + 1), "test_acc": a, "train_loss": 1.0} for i, a in enumerate(accs)]
    return {"optimizer": opt, "batch_size": batch, "seed": seed, "history": hist, "diverged": False,
            "reached_epoch": reached, "reached_seconds": None if reached is None else 0.5 * reached}


def test_summary_and_markdown_table():
    runs = [_run("fop", 64, 0, 2, [80, 95]), _run("fop", 64, 1, 4, [70, 80, 90, 96]),
            _run("sgd", 64, 0, None, [50, 60]), _run("sgd", 64, 1, 3, [60, 70, 95]),
            _run("fop", 128, 0, None, [10]), _run("fop", 128, 1, None, [20])]
    rows = summarize(runs)
    fop64 = rows[0]
    assert (fop64["optimizer"], fop64["batch_size"], fop64["reached"]) == ("fop", 64, 2)
    assert fop64["epochs_mean"] == pytest.approx(3.0) and fop64["epochs_std"] == pytest.approx(2 ** 0.5)
    assert fop64["seconds_mean"] == pytest.approx(1.5)
    table = markdown_table(rows, 95.0)
    assert "| fop | 3.0±1.4 / 1.5±0.7 | - |" in table
    assert "| sgd | 3.0±0.0 / 1.5±0.0 (1/2) | n/a |" in table
    assert "| fop | 95.50±0.71 | 15.00±7.07 |" in table


# ---------------------------------------------------------------------------------------------- CLI end to end


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_cli_end_to_end(tmp_path, capsys):
    data_dir = tmp_path / "data"
    _make_idx_dataset(str(data_dir))
    out = tmp_path / "out"
    rc = train.main(["--data", "mnist", "--data-dir", str(data_dir), "--model", "mlp", "--width", "32",
                     "--optimizers", "sgd,adamw", "--batch-sizes", "32,full", "--seeds", "0,1", "--epochs", "6",
                     "--target", "90", "--lr", "sgd=0.2", "--lr", "adamw=0.01", "--base-batch", "32",
                     "--warmup-epochs", "0.5", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Epochs / seconds to 90% test accuracy" in printed

    result = json.loads((out / "results.json").read_text())
    meta = result["meta"]
    assert meta["torch"] == torch.__version__ and meta["device"] == "cpu"
    assert "backends" in meta["fop_kernels"] or "error" in meta["fop_kernels"]
    assert meta["dataset"]["train"] == 96 and meta["batch_sizes"] == [32, 96]
    assert meta["optimizers"]["sgd"]["lr_by_batch"] == {"32": pytest.approx(0.2), "96": pytest.approx(0.6)}
    assert meta["optimizers"]["sgd"]["kwargs"]["momentum"] == 0.9
    assert meta["config"]["warmup_epochs"] == 0.5 and meta["config"]["schedule"] == "cosine"
    runs = result["runs"]
    assert len(runs) == 2 * 2 * 2
    assert {(r["optimizer"], r["batch_size"], r["seed"]) for r in runs} == {
        (o, b, s) for o in ("sgd", "adamw") for b in (32, 96) for s in (0, 1)}
    for r in runs:
        assert r["steps_per_epoch"] == (3 if r["batch_size"] == 32 else 1)
        hist = r["history"]
        assert 1 <= len(hist) <= 6
        assert [p["epoch"] for p in hist] == list(range(1, len(hist) + 1))
        assert all(b["seconds"] > a["seconds"] for a, b in zip(hist, hist[1:]))
        if r["reached_epoch"] is not None:  # stopped at the first epoch that reached the target
            assert r["reached_epoch"] == len(hist) and hist[-1]["test_acc"] >= 90
            assert all(p["test_acc"] < 90 for p in hist[:-1])
        else:
            assert len(hist) == 6
    # the quadrant task is easy: at the small batch both optimizers learn it
    assert all(r["reached_epoch"] is not None for r in runs if r["batch_size"] == 32)
    assert len(result["summary"]) == 4

    table = (out / "table.md").read_text()
    assert "| optimizer | batch 32 | batch 96 |" in table and "| sgd |" in table and "| adamw |" in table
    width, height = _png_size(out / "accuracy.png")
    assert (width, height) == (2 * PLOT_PANEL_INCHES[0] * PLOT_DPI, 2 * PLOT_PANEL_INCHES[1] * PLOT_DPI)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(out / "accuracy.png"))
    assert pixels.shape[:2] == (height, width)
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_cli_same_seed_same_initial_model_across_optimizers(tmp_path):
    _make_idx_dataset(str(tmp_path / "d"))
    out = tmp_path / "o"
    train.main(["--data", "mnist", "--data-dir", str(tmp_path / "d"), "--model", "cnn", "--optimizers",
                "sgd,adamw", "--batch-sizes", "48", "--epochs", "1", "--out", str(out), "--quiet", "--no-stop"])
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs[0]["initial_acc"] == runs[1]["initial_acc"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optimizers", "sgd,lion"], "unknown optimizer 'lion'; valid: sgd, adamw"),
        (["--model", "vgg"], "unknown model 'vgg'; valid: cnn, mlp, resnet, transformer"),
        (["--data", "cifar"], "unknown dataset 'cifar'; valid: digits, mnist"),
        (["--data", "mnist", "--data-dir", "/nonexistent/mnist"], "train-images-idx3-ubyte"),
        (["--batch-sizes", "5000"], r"batch size 5000 is larger than the training set \(1437 samples\) of digits"),
        (["--batch-sizes", "big"], "neither an integer nor 'full'"),
        (["--target", "150"], "--target is a test accuracy in percent"),
        (["--opt-arg", "sgd.momentum"], "expected NAME.KEY=VALUE"),
        (["--opt-arg", "sgd=1"], "expected OPTIMIZER.KEY=VALUE"),
        (["--lr", "lion=0.1"], "unknown optimizer 'lion' in --lr/--opt-arg"),
        (["--optimizers", "sgd", "--opt-arg", "sgd.momentum=-1"], "sgd: Invalid momentum value: -1"),
        (["--optimizers", "sgd", "--opt-arg", "sgd.dampng=0.1"], "sgd: .*unexpected keyword argument 'dampng'"),
        (["--optimizers", "kfac", "--opt-arg", "kfac.product_dtype=torch.bf16"], "torch.bf16 is not a torch dtype"),
        (["--optimizers", "kfac", "--opt-arg", "kfac.product_dtype=torch.float16"],
         "kfac: product_dtype=torch.float16 is"),
    ],
)
def test_cli_clear_errors(tmp_path, capsys, args, message):
    argv = ["--epochs", "1", "--out", str(tmp_path), "--quiet"] + args
    if "--optimizers" not in args:
        argv += ["--optimizers", "sgd"]
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_unavailable_optimizer_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(train.OPTIMIZERS, "ghost", train.OptimizerSpec("fop:NoSuchOptimizer", True, 0.1))
    assert "ghost" not in train.available_optimizers()
    with pytest.raises(SystemExit):
        train.main(["--optimizers", "ghost", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "optimizer 'ghost' is not available in this installation" in err and "valid: sgd, adamw" in err
    with pytest.raises(ValueError, match="not available"):
        train.make_optimizer("ghost", torch.nn.Linear(2, 2), 0.1)


def test_list(capsys):
    assert train.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "sgd" in out and "available" in out and "transformer" in out and "mnist" in out


def test_divergence_is_recorded():
    data = load_digits()
    config = train.RunConfig(model="mlp", epochs=3, warmup_epochs=0, schedule="constant")
    record = train.run_one(data, "sgd", 512, 0, config, lr=1e6)
    assert record["diverged"] and record["reached_epoch"] is None
    assert len(record["history"]) < 3


def test_cli_merge_of_separate_seed_runs(tmp_path, capsys):
    _make_idx_dataset(str(tmp_path / "d"))
    common = ["--data", "mnist", "--data-dir", str(tmp_path / "d"), "--model", "mlp", "--width", "16",
              "--optimizers", "sgd", "--batch-sizes", "48", "--epochs", "2", "--quiet"]
    for seed in ("0", "1"):
        assert train.main(common + ["--seeds", seed, "--out", str(tmp_path / f"s{seed}")]) == 0
    parts = [str(tmp_path / f"s{s}" / "results.json") for s in ("0", "1")]
    assert train.main(["--merge", *parts, "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert [r["seed"] for r in merged["runs"]] == [0, 1] and merged["meta"]["seeds"] == [0, 1]
    assert merged["summary"][0]["seeds"] == 2 and merged["meta"]["merged_from"] == parts
    assert (tmp_path / "merged" / "accuracy.png").exists() and (tmp_path / "merged" / "table.md").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train.main(["--merge", parts[0], parts[0], "--out", str(tmp_path / "again")])
    assert "repeat an (optimizer, batch size, seed) run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(["--merge", str(tmp_path / "none.json"), "--out", str(tmp_path / "again")])
    assert "cannot read runs from" in capsys.readouterr().err


def test_opt_arg_takes_a_torch_dtype(tmp_path):
    """--opt-arg kfac.product_dtype=torch.bfloat16 reaches the constructor as the dtype (the run records it)."""
    out = tmp_path / "o"
    train.main(["--model", "mlp", "--optimizers", "kfac", "--opt-arg", "kfac.product_dtype=torch.bfloat16",
                "--batch-sizes", "256", "--epochs", "1", "--out", str(out), "--quiet", "--no-stop"])
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 1 and not runs[0]["diverged"]


def test_fop_split_backward_trains_with_two_half_batch_passes(caplog):
    """With --opt-arg fop.split=backward the loop runs two half-batch backward passes per step, so FOP never falls
    back to K-FAC (which it does, with a warning, on a step with one pass), and it trains."""
    data = load_digits()
    config = train.RunConfig(model="mlp", epochs=2, warmup_epochs=0, schedule="constant")
    overrides = dict(split="backward", damping_mode="factored", inverse_method="cholesky")
    with caplog.at_level("WARNING", logger="fop"):
        record = train.run_one(data, "fop", 256, 0, config, lr=0.05, overrides=overrides)
    assert "falls back" not in caplog.text and "K-FAC update" not in caplog.text
    assert not record["diverged"]
    assert record["history"][-1]["test_acc"] > record["initial_acc"] + 20
