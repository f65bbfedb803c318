"""The one configuration of the method: dataclasses that validate themselves.

Every default lives here. ``OAQConfig`` maps one-to-one to the ``oaq:`` section of an option file;
``OAQConfig.from_dict`` rejects unknown keys (naming the closest valid one), wrong types and values
out of range with a :class:`~oaq_plugin.errors.ConfigError`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from .errors import ConfigError, closest

ACT_QUANTIZERS = ('dual_region', 'minmax', 'percentile', 'mse')
LEVELS = ('paper', 'pwlq')
WEIGHT_GRANULARITIES = ('channel', 'tensor')
WEIGHT_GRIDS = ('paper', 'zero')
PROTOCOLS = ('full', 'float_ends')
BREAKPOINT_STATS = ('signed', 'abs')
KERNELS = ('auto', 'triton', 'reference', 'fake')
FINETUNE_MODES = ('sensitivity', 'vanilla')
TAP_SETS = ('blocks', 'layers')
IO_BACKENDS = ('disk', 'lmdb')
ALLOCATION_WEIGHTINGS = ('params', 'layers')
LR_MODES = ('absolute', 'relative')
MIN_BITS, MAX_BITS = 2, 8


def _choice(*values: str) -> Dict[str, Any]:
    return {'choices': values}


def _range(low: Optional[float] = None, high: Optional[float] = None) -> Dict[str, Any]:
    return {'range': (low, high)}


@dataclass
class CalibConfig:
    """Calibration data and statistics (METHOD.md §5).

    Args:
        dataroot_lq: Folder of LR images, or a BasicSR LMDB folder (``io_backend: lmdb``).
        io_backend: ``disk`` or ``lmdb``.
        num_images: How many images to use (``None``: all of them).
        patch_size: Side of the random LR patches, in LR pixels.
        batch_size: Patches per calibration batch.
        num_batches: Calibration batches (the paper: one pass over its images, 16 patches a batch).
        seed: Seed of the patch sampler; the same seed gives the same patches.
        ema_beta: EMA factor across batches: theta <- beta*theta + (1-beta)*theta_batch.
        percentile: Percentile that sets the breakpoint (dual-region) and the clip (percentile baseline).
        breakpoint_stat: Percentile of the ``signed`` values (paper) or of ``abs`` values.
        sample_size: Activation values kept per layer (bounded memory) for the MSE clip search and plots.
    """

    dataroot_lq: Optional[str] = None
    io_backend: str = field(default='disk', metadata=_choice(*IO_BACKENDS))
    num_images: Optional[int] = field(default=None, metadata=_range(1))
    patch_size: int = field(default=96, metadata=_range(8))
    batch_size: int = field(default=16, metadata=_range(1))
    num_batches: int = field(default=6, metadata=_range(1))
    seed: int = 0
    ema_beta: float = field(default=0.9, metadata=_range(0.0, 1.0))
    percentile: float = field(default=99.0, metadata=_range(50.0, 100.0))
    breakpoint_stat: str = field(default='signed', metadata=_choice(*BREAKPOINT_STATS))
    sample_size: int = field(default=65536, metadata=_range(1024))


@dataclass
class SearchConfig:
    """Per-layer search of breakpoint and clips by the error of the layer's output (issue: search stage).

    Args:
        enabled: Run the search; off keeps the fixed-percentile initialization of the paper.
        breakpoint: Search the dual-region breakpoint.
        act_clip: Also search the activation bounds (lower/upper) inside the observed range. Off by default:
            it lowers each layer's output error on the captured windows but clips tails that other images
            reach (the demo's W4A4 model lost 0.7 dB on a held-out image with it; docs/BENCHMARKS.md).
        weight_clip: Search the weight clip by the layer output error (after the shrink search).
        level_split: Also search how the levels are split between the dense region and the tails.
        center: Also search the centre of the dense region, ``[c - bp, c + bp]`` instead of the paper's
            ``[-bp, bp]``, for skewed inputs.
        grid_size: Candidates per coarse grid.
        refine_rounds: Finer grids around the best candidate.
        num_samples: Calibration patches whose layer inputs are captured for the search.
        window: Side of the random window cut from each captured layer input (bounds memory and time).
        sweeps: Coordinate-descent passes over a layer's parameters.
        sequential: Search layers in execution order, each on the inputs of the network whose earlier
            layers are already quantized (float inputs otherwise); the target is always the float output.
        memory_mb: Budget for the captured inputs; layers are processed in groups that fit it.
        seed: Seed of the captured windows.
    """

    enabled: bool = True
    breakpoint: bool = True
    act_clip: bool = False
    weight_clip: bool = True
    level_split: bool = False
    center: bool = False
    grid_size: int = field(default=16, metadata=_range(2))
    refine_rounds: int = field(default=2, metadata=_range(0))
    num_samples: int = field(default=8, metadata=_range(1))
    window: int = field(default=32, metadata=_range(4))
    sweeps: int = field(default=1, metadata=_range(1))
    sequential: bool = False
    memory_mb: int = field(default=1024, metadata=_range(16))
    seed: int = 0


@dataclass
class RoundingConfig:
    """Learned weight rounding (AdaRound-style), layer by layer after the search; beyond the paper.

    Each weight rounds down or up by a learned choice instead of to nearest, chosen so that the layer's
    output on captured calibration windows (its input quantized) matches the float layer's output.

    Args:
        enabled: Run the stage.
        iterations: Adam steps per layer.
        lr: Adam learning rate of the rounding variables.
        reg_weight: Weight of the regulariser (a mean in [0, 1]) that drives every choice to 0 or 1,
            against the layer's output error divided by its output energy.
        warmup: Fraction of the iterations without the regulariser.
        num_samples: Calibration patches whose layer inputs are captured.
        window: Side of the random window cut from each captured layer input.
        batch_size: Captured windows per Adam step (drawn at random from the ``num_samples``).
        sequential: Capture each layer's inputs in the network whose earlier layers are already quantized
            (with their learned rounding), so a layer can make up for the error before it.
        memory_mb: Budget for the captured float inputs.
        seed: Seed of the captured windows.
    """

    enabled: bool = False
    iterations: int = field(default=300, metadata=_range(1))
    lr: float = field(default=1e-2, metadata=_range(0.0))
    reg_weight: float = field(default=0.1, metadata=_range(0.0))
    warmup: float = field(default=0.2, metadata=_range(0.0, 1.0))
    num_samples: int = field(default=16, metadata=_range(1))
    window: int = field(default=32, metadata=_range(4))
    batch_size: int = field(default=4, metadata=_range(1))
    sequential: bool = True
    memory_mb: int = field(default=1024, metadata=_range(16))
    seed: int = 0


@dataclass
class ReconstructionConfig:
    """Block reconstruction (BRECQ/QDrop-style), block by block after the search; beyond the paper.

    The network is cut into blocks (a module with at most ``max_layers`` quantized layers; a larger one is
    cut into its children) and each block, in execution order and on the inputs it sees with the earlier
    blocks quantized, learns its weights' rounding and its activation quantizers' bounds and breakpoints
    so that its output matches the float block's.

    Args:
        enabled: Run the stage.
        max_layers: The most quantized layers a block may hold.
        iterations: Adam steps per block.
        lr: Adam learning rate of the rounding variables.
        act_lr: Adam learning rate of each activation bound and breakpoint, times its initial magnitude.
        reg_weight: Weight of the rounding regulariser (a mean in [0, 1]) against the block's output error
            divided by its output energy.
        warmup: Fraction of the iterations without the regulariser.
        drop_prob: While learning, the fraction of each activation quantizer's input values passed
            unquantized (at random, each step).
        rounding: Learn the weights' rounding.
        activations: Learn the activation quantizers' bounds and breakpoints.
        num_samples: Calibration patches whose block inputs and outputs are captured.
        patch_size: Side of the (top-left) part of each patch that is used.
        batch_size: Patches per Adam step (drawn at random from the ``num_samples``).
        seed: Seed of the batches and of the unquantized values.
    """

    enabled: bool = False
    max_layers: int = field(default=16, metadata=_range(1))
    iterations: int = field(default=250, metadata=_range(1))
    lr: float = field(default=1e-2, metadata=_range(0.0))
    act_lr: float = field(default=1e-2, metadata=_range(0.0))
    reg_weight: float = field(default=0.1, metadata=_range(0.0))
    warmup: float = field(default=0.2, metadata=_range(0.0, 1.0))
    drop_prob: float = field(default=0.5, metadata=_range(0.0, 1.0))
    rounding: bool = True
    activations: bool = True
    num_samples: int = field(default=32, metadata=_range(1))
    patch_size: int = field(default=48, metadata=_range(4))
    batch_size: int = field(default=4, metadata=_range(1))
    seed: int = 0


@dataclass
class FinetuneConfig:
    """Sensitivity-aware finetuning (METHOD.md §6-7).

    Args:
        enabled: Run finetuning after calibration/search.
        mode: ``sensitivity`` (SAFT: tap weights s_k) or ``vanilla`` (uniform tap weights).
        epochs: Epochs; the groups u_w -> (l_a, u_a) -> bp train in turn, one group an epoch.
        iters_per_epoch: Iterations per epoch.
        batch_size: LR patches per iteration.
        patch_size: Side of the LR patches.
        lr: Adam learning rate of every group.
        lr_decay: Each group's learning rate is multiplied by this after an epoch in which it trained.
        lr_mode: ``absolute`` (the paper: every parameter steps by about ``lr``) or ``relative`` (each
            parameter's learning rate is ``lr`` times its initial magnitude, so clips of 0.05 and bounds
            of 50 move by the same fraction).
        rec_weight: lambda, the weight of the output reconstruction loss.
        sen_weight: w_sen, the weight of the feature (sensitivity) loss.
        temperature: Softmax temperature of the tap weights s_k.
        taps: ``blocks`` (outputs of residual blocks) or ``layers`` (inputs of quantized layers).
        tap_patterns: Module-name patterns (fnmatch) whose outputs are the taps, overriding ``taps``.
        tap_samples: Calibration crops on which the taps' standard deviations (for s_k) are measured.
        output_scale: Factor bringing the SR output to the 0-255 scale of the reconstruction loss
            (255 for networks with [0, 1] outputs).
        fast_fake_quant: Train through a fake quantization with a closed-form backward (the same
            values and gradients as the reference arithmetic up to float rounding, several times
            faster on a CPU); false trains through the reference arithmetic.
        seed: Seed of crops and augmentation.
    """

    enabled: bool = False
    mode: str = field(default='sensitivity', metadata=_choice(*FINETUNE_MODES))
    epochs: int = field(default=10, metadata=_range(1))
    iters_per_epoch: int = field(default=50, metadata=_range(1))
    batch_size: int = field(default=2, metadata=_range(1))
    patch_size: int = field(default=96, metadata=_range(8))
    lr: float = field(default=1e-3, metadata=_range(0.0))
    lr_decay: float = field(default=0.9, metadata=_range(0.0, 1.0))
    lr_mode: str = field(default='absolute', metadata=_choice(*LR_MODES))
    rec_weight: float = field(default=5.0, metadata=_range(0.0))
    sen_weight: float = field(default=10.0, metadata=_range(0.0))
    temperature: float = field(default=1.0, metadata=_range(1e-6))
    taps: str = field(default='blocks', metadata=_choice(*TAP_SETS))
    tap_patterns: List[str] = field(default_factory=list)
    tap_samples: int = field(default=16, metadata=_range(1))
    output_scale: float = field(default=255.0, metadata=_range(1e-6))
    fast_fake_quant: bool = True
    seed: int = 0


@dataclass
class TileConfig:
    """Tiled validation of large images. ``size: 0`` validates whole images."""

    size: int = field(default=0, metadata=_range(0))
    pad: int = field(default=16, metadata=_range(0))


@dataclass
class AnalysisConfig:
    """Optional analyses written next to the results.

    Args:
        layer_sensitivity: Quantize one layer at a time (the rest float) and report/plot each one's PSNR.
        num_images: Images (held-out calibration crops) the analyses are measured on.
        sensitivity_bits: Width every layer is analysed at (the paper's analysis: 4); ``None`` keeps each
            layer's planned bits (8 for the ends under the ``full`` protocol).
        bit_allocation: Also allocate bits per body layer from the sensitivity under the average budget of
            ``w_bits``, and measure it against uniform bits (fidelity PSNR on held-out calibration crops).
        allocation_offsets: Widths offered to each body layer, relative to ``w_bits``.
        allocation_weighting: The budget averages bits over layers weighted by their number of weights
            (``params``) or equally (``layers``).
    """

    layer_sensitivity: bool = False
    num_images: int = field(default=4, metadata=_range(1))
    sensitivity_bits: Optional[int] = field(default=None, metadata=_range(MIN_BITS, MAX_BITS))
    bit_allocation: bool = False
    allocation_offsets: List[int] = field(default_factory=lambda: [-1, 0, 1])
    allocation_weighting: str = field(default='params', metadata=_choice(*ALLOCATION_WEIGHTINGS))


@dataclass
class OAQConfig:
    """The whole method, as the ``oaq:`` section of an option file.

    Args:
        w_bits: Weight bits of the body layers (2-8).
        a_bits: Activation bits of the body layers (2-8).
        act_quantizer: ``dual_region`` (the method) or a uniform baseline: ``minmax``, ``percentile``, ``mse``.
        levels: Dual-region level allocation: ``paper`` (honest b-bit code) or ``pwlq`` ((b+1)-bit).
        weight_granularity: ``channel`` (per output channel clips) or ``tensor`` (the paper).
        weight_grid: ``paper`` (2^b levels, no zero level) or ``zero`` (symmetric grid with zero).
        protocol: ``full`` (first/last/upsampler convs at W8A8) or ``float_ends`` (those left in float).
        end_bits: Bits of first/last/upsampler layers under the ``full`` protocol.
        layer_bits: Overrides by layer-name pattern (fnmatch): ``{pattern: [w_bits, a_bits]}``, an int for
            both, or ``float`` to leave the layer unquantized. Later patterns win.
        exclude: Layer-name patterns never quantized.
        quantize_attention: Also quantize both operands of the two matmuls (q·kᵀ and attn·v) of every
            window-attention module (SwinIR's ``WindowAttention``) with the activation quantizer at ``a_bits``;
            ``exclude`` and ``layer_bits`` patterns matching the attention module's name apply. These
            matmuls always run as fake quantization (the integer kernels cover Conv2d/Linear only).
        kernel: Backend at validation: ``auto`` (triton on CUDA, reference otherwise), ``triton``,
            ``reference`` or ``fake``.
        resume: Continue an interrupted run from its saved state (as BasicSR's ``--auto_resume`` does).
            A run stopped by SIGINT/SIGTERM saves its state at the next safe point; the resumed run ends
            with the parameters an uninterrupted one would have, and is refused if the options (other than
            ``kernel``, ``tile``, ``analysis``), the weights or the calibration data changed.
    """

    w_bits: int = field(default=4, metadata=_range(MIN_BITS, MAX_BITS))
    a_bits: int = field(default=4, metadata=_range(MIN_BITS, MAX_BITS))
    act_quantizer: str = field(default='dual_region', metadata=_choice(*ACT_QUANTIZERS))
    levels: str = field(default='paper', metadata=_choice(*LEVELS))
    weight_granularity: str = field(default='channel', metadata=_choice(*WEIGHT_GRANULARITIES))
    weight_grid: str = field(default='paper', metadata=_choice(*WEIGHT_GRIDS))
    protocol: str = field(default='full', metadata=_choice(*PROTOCOLS))
    end_bits: int = field(default=8, metadata=_range(MIN_BITS, MAX_BITS))
    layer_bits: Dict[str, Any] = field(default_factory=dict)
    exclude: List[str] = field(default_factory=list)
    quantize_attention: bool = False
    kernel: str = field(default='auto', metadata=_choice(*KERNELS))
    resume: bool = False
    calib: CalibConfig = field(default_factory=CalibConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tile: TileConfig = field(default_factory=TileConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def __post_init__(self) -> None:
        _validate(self, 'oaq')
        _validate_layer_bits(self.layer_bits)

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> 'OAQConfig':
        """Build from an option-file section, rejecting unknown keys and bad values."""
        return _from_dict(cls, options or {}, 'oaq')

    @classmethod
    def coerce(cls, value: Union['OAQConfig', Mapping[str, Any], None]) -> 'OAQConfig':
        """Accept a config, a mapping (an option-file section) or ``None`` (the defaults)."""
        if isinstance(value, cls):
            return value
        if value is None or isinstance(value, Mapping):
            return cls.from_dict(value)
        raise ConfigError(f'oaq: expected an OAQConfig or a mapping, got {type(value).__name__}')

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict (JSON/YAML-ready) that ``from_dict`` turns back into this config."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> 'OAQConfig':
        """A copy with some top-level fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def float_ends(self) -> bool:
        """Whether first/last/upsampler layers stay in float."""
        return self.protocol == 'float_ends'


def _type_hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type, options: Mapping[str, Any], where: str) -> Any:
    if not isinstance(options, Mapping):
        raise ConfigError(f'{where}: expected a mapping of options, got {type(options).__name__} {options!r}')
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)
    kwargs: Dict[str, Any] = {}
    for key, value in options.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{key}'{closest(key, fields)}; valid keys: "
                              f"{', '.join(fields)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value if value is not None else {}, f'{where}.{key}')
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f'{where}: {error}') from None


def _validate(obj: Any, where: str) -> None:
    hints = _type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = f'{where}.{f.name}'
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(f'{name}: expected a mapping of options, got {value!r}')
            _validate(value, name)
            continue
        value = _check_type(value, hint, name)
        setattr(obj, f.name, value)
        choices = f.metadata.get('choices')
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}: unknown value '{value}'{closest(value, choices)}; "
                              f"choose one of: {', '.join(choices)}")
        bounds = f.metadata.get('range')
        if bounds is not None and value is not None:
            low, high = bounds
            if (low is not None and value < low) or (high is not None and value > high):
                span = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
                raise ConfigError(f'{name}: {value} is outside the valid range {span}')


def _check_type(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], name)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{name}: expected true or false, got {value!r}')
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f'{name}: expected an integer, got {value!r}')
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{name}: expected a number, got {value!r}')
        if value != value or value in (float('inf'), float('-inf')):
            raise ConfigError(f'{name}: expected a finite number, got {value!r}')
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f'{name}: expected a string, got {value!r}')
        return value
    if origin in (list, List):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f'{name}: expected a list, got {value!r}')
        return [_check_type(v, args[0], f'{name}[{i}]') for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f'{name}: expected a mapping, got {value!r}')
        return dict(value)
    return value


def _validate_layer_bits(layer_bits: Mapping[str, Any]) -> None:
    for pattern, bits in layer_bits.items():
        parse_layer_bits(pattern, bits)


def parse_layer_bits(pattern: str, bits: Any) -> Optional[tuple]:
    """``(w_bits, a_bits)`` for a ``layer_bits`` entry, ``None`` for ``float``; raises on bad input."""
    where = f"oaq.layer_bits['{pattern}']"
    if not isinstance(pattern, str):
        raise ConfigError(f'oaq.layer_bits: patterns must be strings, got {pattern!r}')
    if bits == 'float':
        return None
    if isinstance(bits, int) and not isinstance(bits, bool):
        pair = (bits, bits)
    elif isinstance(bits, (list, tuple)) and len(bits) == 2:
        pair = tuple(bits)
    else:
        raise ConfigError(f"{where}: expected bits as an integer, [w_bits, a_bits] or 'float', got {bits!r}")
    for b in pair:
        if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
            raise ConfigError(f'{where}: bits must be integers in [{MIN_BITS}, {MAX_BITS}], got {bits!r}')
    return pair
