"""Files in and out: the safetensors format, sources (checkpoints, artifacts, sequences) and writers.

Nothing here knows an operator or a recipe; the engine reads through sources and writes through writers.
"""
