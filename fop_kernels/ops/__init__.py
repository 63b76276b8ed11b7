"""The public ops: validate inputs, then call the implementation that dispatch picks.

One module per op family; each registers its reference implementation with the dispatcher.
"""
