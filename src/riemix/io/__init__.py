"""Files riemix writes and reads back.

Modules:
    fileio: atomic writes of files and whole directories (the only atomic-write code).
    adapter: the adapter directory format (``save_adapter`` / ``load_adapter``).
    checkpoint: resumable training checkpoints.
"""
