"""Tools beside the chapters, each run from the project's root with `python -m`:

    python -m tools.datasets   fake datasets in the real layouts, dataset preparation, statistics
    python -m tools.benchmark  what optimal transport costs (the paper's Table 3) and the Sinkhorn table
    python -m tools.gpu_check  one command that proves every CUDA path on a GPU machine
"""
