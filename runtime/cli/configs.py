"""The commands' own flags as typed, frozen configs (the engine's, the bench's, the probe's, the pool's and the
server's live with what they configure: runtime/engine/config.py, measure/, services/). Each checks itself
when built; the parser (runtime/cli/parser.py) takes every default from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.args import PRESETS
from model.errors import ConfigError
from runtime.engine.config import FlagConfig
from runtime.format.image import WeightFormat

DTYPES = ("bf16", "fp16", "fp32")
SHAPES = tuple(PRESETS)  # the published shapes of every architecture (model/args.py), and tiny ones for tests


@dataclass(frozen=True)
class PackConfig(FlagConfig):
    out: str
    checkpoint: str | None = None
    synthetic: str | None = None
    layers: int | None = None
    seed: int = 0
    manifest: str | None = None
    dtype: str | None = None  # None: bf16, and a GGUF's quantized blocks kept as they are
    keep_blocks: bool = False
    quantize: str | None = None
    group_size: int = 64
    quantize_output: bool = False
    device: str | None = None
    force: bool = False
    no_verify: bool = False
    quiet: bool = False
    tensor_parallel: int = 1

    def weight_format(self) -> WeightFormat:
        """--dtype alone dequantizes a GGUF's blocks (to that dtype); without it, or with --keep-blocks, they
        are kept."""
        return WeightFormat(self.dtype or "bf16", self.quantize, self.group_size, self.quantize_output,
                            keep_blocks=self.keep_blocks or self.dtype is None)

    def __post_init__(self) -> None:
        self.weight_format()  # refuses a format, group size or combination before anything is opened
        if (self.checkpoint is None) == (self.synthetic is None):
            raise ConfigError("give one of --checkpoint and --synthetic")
        if self.layers is not None and self.synthetic is None:
            raise ConfigError("--layers applies only with --synthetic")
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"--layers must be at least 1, found {self.layers}")
        if self.tensor_parallel < 1:
            raise ConfigError(f"--tensor-parallel must be at least 1, found {self.tensor_parallel}")
        if self.tensor_parallel > 1 and self.quantize:
            raise ConfigError(f"--tensor-parallel {self.tensor_parallel} splits plain weights only: leave out "
                              f"--quantize")


@dataclass(frozen=True)
class ImageRef(FlagConfig):
    """--image / --manifest (None: the embedded model, or with --attach the pool's image)."""

    image: str | None = None
    manifest: str | None = None


@dataclass(frozen=True)
class RunConfig(FlagConfig):
    image: str | None = None
    manifest: str | None = None
    prompt: str | None = None
    prompt_ids: str | None = None
    prompts: str | None = None
    batch_size: int = 1
    chat: bool = False
    max_seq_len: int | None = None
    device: str | None = None
    out_json: str | None = None
    no_server: bool = False
    tensor_parallel: int = 1
    devices: str | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ConfigError(f"--tensor-parallel must be at least 1, found {self.tensor_parallel}")
        if self.devices is not None and self.tensor_parallel == 1:
            raise ConfigError("--devices applies with --tensor-parallel N")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, found {self.batch_size}")
        if self.batch_size > 1 and not self.prompts:
            raise ConfigError("--batch-size applies to --prompts FILE")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ConfigError(f"--max-seq-len must be at least 1, found {self.max_seq_len}")


@dataclass(frozen=True)
class PerplexityConfig(FlagConfig):
    text_file: str
    image: str | None = None
    manifest: str | None = None
    context: int = 512
    device: str | None = None
    out_json: str | None = None

    def __post_init__(self) -> None:
        if self.context < 2:
            raise ConfigError(f"--context must be at least 2, found {self.context}")


@dataclass(frozen=True)
class PoolStopConfig(FlagConfig):
    name: str
    timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be positive, found {self.timeout}")


@dataclass(frozen=True)
class PoolListConfig(FlagConfig):
    json: bool = False


@dataclass(frozen=True)
class PoolStatusConfig(FlagConfig):
    name: str
    watch: bool = False
    interval: float = 1.0
    json: bool = False


@dataclass(frozen=True)
class PoolCleanupConfig(FlagConfig):
    name: str | None = None
