"""The image on disk: its layout and validation (image.py), block devices (blockdev.py), packing a checkpoint
into one (pack.py) through staged writes that lose nothing (staged.py), an image's tokenizer (tokens.py) and the
embedded default model (embedded.py). Torch-free except the packing itself."""
