"""The configuration: what the method reads (``OAQConfig``) and how a run executes (``RunOptions``).

Every default and every choice list lives here, once. The ``oaq:`` section of an option file holds both;
``OAQOptions.from_dict`` splits it, rejecting unknown keys (naming the closest valid one), wrong types and
values out of range with a :class:`~oaq_plugin.errors.ConfigError`.
"""
from __future__ import annotations

import dataclasses
import functools
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from .errors import ConfigError, closest

UNIFORM_METHODS = ('minmax', 'percentile', 'mse')
ACT_QUANTIZERS = ('dual_region',) + UNIFORM_METHODS
LEVELS = ('paper', 'pwlq')
WEIGHT_GRANULARITIES = ('channel', 'tensor')
WEIGHT_GRIDS = ('paper', 'zero')
PROTOCOLS = ('full', 'float_ends')
BREAKPOINT_STATS = ('signed', 'abs')
BACKENDS = ('auto', 'triton', 'triton_int8', 'reference', 'fake', 'onnxruntime')
FINETUNE_MODES = ('sensitivity', 'vanilla')
TAP_SETS = ('blocks', 'layers')
IO_BACKENDS = ('disk', 'lmdb')
ALLOCATION_WEIGHTINGS = ('params', 'layers')
LR_MODES = ('absolute', 'relative')
MIN_BITS, MAX_BITS = 2, 8
# Activation grids with at most this many bits are the ones the training stages (block reconstruction,
# distillation) learn by default; finer grids keep their calibrated and searched values.
LEARNED_ACTIVATION_BITS = 6


def _choice(*values: str) -> Dict[str, Any]:
    return {'choices': values}


def _range(low: Optional[float] = None, high: Optional[float] = None) -> Dict[str, Any]:
    return {'range': (low, high)}


@dataclass
class CalibConfig:
    """Calibration data and statistics (docs/METHOD.md, Calibration statistics).

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
    """Block reconstruction (BRECQ/QDrop-style), block by block after the search; beyond the paper. On by
    default: it measured best on the held-out split (docs/BENCHMARKS.md, "The default recipe"); the
    ``paper`` preset turns it off.

    The network is cut into blocks (a module with at most ``max_layers`` quantized layers; a larger one is
    cut into its children) and each block, in execution order and on the inputs it sees with the earlier
    blocks quantized, learns its weights' rounding and its activation quantizers' bounds and breakpoints
    so that its output matches the float block's.

    Args:
        enabled: Run the stage.
        max_layers: The most quantized layers a block may hold.
        iterations: Adam steps per block. 100 by default: with distillation after it, 150 fewer steps per block
            bought distillation's longer run within the time budget, which gained more on held-out crops
            (docs/BENCHMARKS.md, "The default recipe").
        lr: Adam learning rate of the rounding variables.
        act_lr: Adam learning rate of each activation bound and breakpoint, times its initial magnitude.
        reg_weight: Weight of the rounding regulariser (a mean in [0, 1]) against the block's output error
            divided by its output energy.
        warmup: Fraction of the iterations without the regulariser.
        drop_prob: While learning, the fraction of each activation quantizer's input values passed
            unquantized (at random, each step).
        rounding: Learn the weights' rounding.
        activations: Learn the activation quantizers' bounds and breakpoints.
        activation_bits: Learn only those of activation quantizers with at most this many bits; finer grids
            keep their calibrated and searched values. 6 by default: learning the bounds of 8-bit grids on the
            calibration patches lowered held-out fidelity at W8A8 (IMDN 52.06 -> 51.72 dB, RFDN 50.34 -> 49.86)
            and, at W4A4 (the 8-bit end layers), tied on IMDN and RFDN and lost on FSRCNN (26.95 -> 25.91) and
            SRVGG (32.73 -> 32.22; docs/BENCHMARKS.md, "The default recipe").
        num_samples: Calibration patches whose block inputs and outputs are captured.
        patch_size: Side of the (top-left) part of each patch that is used.
        batch_size: Patches per Adam step (drawn at random from the ``num_samples``).
        seed: Seed of the batches and of the unquantized values.
        group_siblings: Where a module too large to be a block is cut into its children and some consecutive
            children run one after another, each on the previous one's output (a flat ``nn.Sequential``, or
            SRVGG's ``body`` list run in a loop), group those children into blocks of up to ``max_layers``
            quantized layers (as even as the limit allows) instead of one block per child.
        weight_clips: Also learn each weight quantizer's clip (its step size: per output channel or per
            tensor, as ``weight_granularity`` says) inside the block objective, LSQ-style, together with
            the rounding.
        weight_lr: Adam learning rate of each weight clip, times its initial magnitude.
        window: Train a block whose input or output is spatially larger than the network's input (an
            upsampler, a block at high resolution) on random windows of this side (in the block's input
            pixels) of its inputs, comparing only the part of its output that the window alone determines
            (found by running the block on a few windows and on the whole inputs); ``0`` trains every block
            on whole inputs. A block whose output depends on its whole input (global pooling) is trained on
            whole inputs.
        output_weight: Weight of a network-output term beside the block term (NWQ-style): each step also runs
            the whole network (earlier blocks quantized, the block learning, later blocks float) on the
            step's calibration patches and adds this times its output error relative to the float
            network's output energy; a block is then kept when this sum drops. ``0`` leaves the term out.
    """

    enabled: bool = True
    max_layers: int = field(default=16, metadata=_range(1))
    iterations: int = field(default=100, metadata=_range(1))
    lr: float = field(default=1e-2, metadata=_range(0.0))
    act_lr: float = field(default=1e-2, metadata=_range(0.0))
    reg_weight: float = field(default=0.1, metadata=_range(0.0))
    warmup: float = field(default=0.2, metadata=_range(0.0, 1.0))
    drop_prob: float = field(default=0.5, metadata=_range(0.0, 1.0))
    rounding: bool = True
    activations: bool = True
    activation_bits: int = field(default=LEARNED_ACTIVATION_BITS, metadata=_range(MIN_BITS, MAX_BITS))
    num_samples: int = field(default=32, metadata=_range(1))
    patch_size: int = field(default=48, metadata=_range(4))
    batch_size: int = field(default=4, metadata=_range(1))
    seed: int = 0
    group_siblings: bool = False
    weight_clips: bool = False
    weight_lr: float = field(default=1e-3, metadata=_range(0.0))
    window: int = field(default=0, metadata=_range(0))
    output_weight: float = field(default=0.0, metadata=_range(0.0))


@dataclass
class EqualizationConfig:
    """Channel equalization before conversion (beyond the paper; oaq_plugin/quant/equalization.py): where a
    conv's output reaches other convs only through ReLU-like ops, its output channels are scaled up and the
    consumers' input channels down by the same factors, so the float function is unchanged and the
    consumers' per-tensor activation grid sees channels of more equal range. Pairs are found by tracing one
    forward and kept only when random factors leave the output unchanged.

    Args:
        enabled: Equalize before conversion.
        strength: Each channel's factor is ``(widest range / its range) ** strength``, ranges measured on the
            calibration batches: 0 changes nothing, 1 brings every channel to the widest one's range (the
            consumers' weights of narrow channels then shrink by the same factor).

    Off by default: on held-out crops it gained 1.2 dB on FSRCNN at W8A8 and lost 2.2 dB on SRVGG at W4A4
    (docs/BENCHMARKS.md, "Channel equalization before conversion").
    """

    enabled: bool = False
    strength: float = field(default=0.5, metadata=_range(0.0, 1.0))


@dataclass
class DistillationConfig:
    """Distillation of the whole quantized network from the float one, with trainable weights; beyond the
    paper. Runs after block reconstruction, on random augmented crops of the calibration images (no
    ground truth): every quantized weight may move off the value reconstruction left it at (its codes then
    follow), and the bounds and breakpoints of activation grids with at most ``activation_bits`` bits
    train with it, so that the quantized network's output matches the float network's (mean squared
    error). The result is kept only when the output error on crops held aside from the training ones drops.

    Args:
        enabled: Run the stage.
        iterations: Adam steps (the learning rates decay to zero on a cosine over them); 0 lets
            ``work_budget`` choose them.
        work_budget: With ``iterations`` 0, the steps are as many as this much work pays for, counted on
            the quantized network (multiply-adds, values quantized, layers; docs/METHOD.md, "Stage:
            distillation"), in tera (10^12) multiply-add equivalents: a light network trains longer in about
            the time a heavy one needs for fewer steps. 9 gives PAN x4 993 steps, which fit its whole run in
            15 minutes on two CPU threads, and IMDN and RFDN x4 1499 and 1696.
        max_iterations: The most steps ``work_budget`` may give.
        batch_size: Crops per step. Two by default: at the same cost, twice the steps on half the crops
            gained on held-out crops (docs/BENCHMARKS.md, "The default recipe").
        patch_size: Side of the crops, in input pixels.
        weight_lr: Adam learning rate of each weight's offset, in units of its quantization step (so a
            weight moves by about this fraction of a step per iteration, at any bit width).
        act_lr: Adam learning rate of each activation bound and breakpoint, times its initial magnitude
            (at least 1 % of its grid's span).
        activation_bits: Learn only the activation quantizers with at most this many bits.
        float_lr: Adam learning rate of the parameters the network keeps in float (the quantized layers'
            biases, PReLU slopes, layers left unquantized), times each tensor's mean magnitude; 0 keeps them
            as they are.
        check_crops: Crops held aside (drawn with their own seed) on which the output error is measured
            before and after.
        drop_prob: While training, the fraction of each activation quantizer's input values passed
            unquantized, drawn anew every forward (QDrop); 0 quantizes every value, as validation does.
        feature_weight: Weight of a feature term added to the output error: the mean, over feature taps,
            of each tap's squared error relative to its float energy. The taps are the outputs of the
            network's repeated residual blocks (the finetuning stage's ``blocks`` taps), or the inputs of
            the quantized layers where it has none. 0 trains on the output alone.
        seed: Seed of the crops (and of the drop masks).
    """

    enabled: bool = True
    iterations: int = field(default=0, metadata=_range(0))
    work_budget: float = field(default=9.0, metadata=_range(0.0))
    max_iterations: int = field(default=2000, metadata=_range(1))
    batch_size: int = field(default=2, metadata=_range(1))
    patch_size: int = field(default=48, metadata=_range(4))
    weight_lr: float = field(default=1e-2, metadata=_range(0.0))
    act_lr: float = field(default=1e-3, metadata=_range(0.0))
    activation_bits: int = field(default=LEARNED_ACTIVATION_BITS, metadata=_range(MIN_BITS, MAX_BITS))
    float_lr: float = field(default=0.0, metadata=_range(0.0))
    check_crops: int = field(default=8, metadata=_range(1))
    drop_prob: float = field(default=0.0, metadata=_range(0.0, 1.0))
    feature_weight: float = field(default=0.0, metadata=_range(0.0))
    seed: int = 0


@dataclass
class FinetuneConfig:
    """Sensitivity-aware finetuning (docs/METHOD.md, Stage: sensitivity-aware finetuning).

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


# What each ``preset`` sets: the one place presets are defined. A preset fills the keys it names that the
# user did not give (a section key by key); every other key keeps the dataclass default.
PRESETS: Dict[str, Dict[str, Any]] = {
    # Today's recommended recipe: the dataclass defaults as they are.
    'default': {},
    # The paper's pipeline and nothing beyond it (docs/METHOD.md): dual-region activations with the honest
    # b-bit level allocation, per-tensor weight clips on the grid without zero (their shrink-search
    # initialization is part of every run), the paper's calibration statistics, no per-layer search, no
    # learned rounding, no block reconstruction, no distillation, and sensitivity-aware finetuning with the
    # paper's settings.
    'paper': {
        'act_quantizer': 'dual_region', 'levels': 'paper', 'weight_granularity': 'tensor', 'weight_grid': 'paper',
        'protocol': 'full', 'end_bits': 8, 'integer_lattice': False,
        'calib': {'batch_size': 16, 'patch_size': 96, 'ema_beta': 0.9, 'percentile': 99.0,
                  'breakpoint_stat': 'signed'},
        'equalization': {'enabled': False},
        'search': {'enabled': False},
        'rounding': {'enabled': False},
        'reconstruction': {'enabled': False},
        'distillation': {'enabled': False},
        'finetune': {'enabled': True, 'mode': 'sensitivity', 'epochs': 10, 'iters_per_epoch': 50, 'batch_size': 2,
                     'patch_size': 96, 'lr': 1e-3, 'lr_decay': 0.9, 'lr_mode': 'absolute', 'rec_weight': 5.0,
                     'sen_weight': 10.0, 'temperature': 1.0, 'taps': 'blocks', 'tap_patterns': []},
    },
}


def with_preset(options: Mapping[str, Any], where: str = 'oaq') -> Dict[str, Any]:
    """``options`` (the method's keys as given) with the keys their ``preset`` sets and they do not give.

    A section given as a mapping is merged key by key (its own keys win); a section given as a config
    object is taken whole. An unknown preset is a :class:`ConfigError` naming the closest one.
    """
    name = options.get('preset', 'default')
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"{where}.preset: unknown value {name!r}{closest(str(name), PRESETS)}; "
                          f"choose one of: {', '.join(PRESETS)}")
    merged = dict(options)
    for key, value in PRESETS[name].items():
        given = merged.get(key)
        if key not in merged:
            merged[key] = _copy_plain(value)
        elif isinstance(value, dict) and (given is None or isinstance(given, Mapping)):
            merged[key] = {**_copy_plain(value), **(given or {})}
    return merged


def _copy_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy_plain(v) for k, v in value.items()}
    return list(value) if isinstance(value, list) else value


@dataclass
class OAQConfig:
    """What the method reads: everything that decides the quantized parameters, and what ``quantize()`` takes.

    Sections may be given as mappings (``OAQConfig(search={'enabled': False})``), as in the option file.

    Args:
        preset: A named recipe (:data:`PRESETS`, the one place each is defined): ``default`` (the defaults
            below, the recommended recipe) or ``paper`` (the paper's pipeline exactly: dual-region, paper
            levels, per-tensor weight clips on the paper's grid, no per-layer search, sensitivity-aware
            finetuning on, nothing beyond the paper). Any key given explicitly, here or in the option file,
            overrides the preset (a section key by key: ``{'preset': 'paper', 'finetune': {'epochs': 2}}``
            keeps finetuning on). ``replace()`` and a section given as a config object do not reapply it.
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
        quantize_generic_attention: Quantize both operands of every matmul of two activations that a module
            other than a window-attention module runs itself (``q @ k.transpose(-2, -1)``, ``torch.matmul``,
            ``bmm``, ``einsum``, ``F.scaled_dot_product_attention``: generic attention), found by tracing one
            forward, with the activation quantizer at ``a_bits`` (patterns naming the module apply, as for
            ``quantize_attention``). ``false`` leaves them in float; the report lists them in ``float_ops``
            either way. Fake quantization on every backend, like the window-attention matmuls.
        integer_lattice: Keep every activation grid on an integer lattice: each level is ``u * n`` with one
            unit ``u`` per quantizer and an integer code ``n + zero_point`` in int8 (int16 for a grid that
            int8 cannot hold, e.g. an 8-bit dual-region grid), so an int8 engine (the ONNX export) runs the
            layer as integer products. Every stage trains the snapped grid (oaq_plugin/quant/integer_lattice.py).
            Off by default: on the held-out split it changed fidelity by -0.25 to +0.33 dB at W4A4 and by -0.03
            to +0.05 dB at W8A8 (six zoo networks; docs/BENCHMARKS.md, "Integer lattice"), beyond the 0.02 dB
            a default may cost.
        equalization: Channel equalization of the network before conversion.
        calib: Calibration data and statistics.
        search: The per-layer search.
        rounding: Learned weight rounding.
        reconstruction: Block reconstruction.
        distillation: Distillation of the whole network with trainable weights.
        finetune: Sensitivity-aware finetuning.
    """

    preset: str = field(default='default', metadata=_choice(*PRESETS))
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
    quantize_generic_attention: bool = True
    integer_lattice: bool = False
    equalization: EqualizationConfig = field(default_factory=EqualizationConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    reconstruction: ReconstructionConfig = field(default_factory=ReconstructionConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self) -> None:
        _validate(self, 'oaq')
        _validate_layer_bits(self.layer_bits)

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> 'OAQConfig':
        """Build from the method's keys of an option-file section, rejecting unknown keys and bad values.

        A run option (``backend``, ``tile``, ...) is refused with a message saying where it goes: use
        :meth:`OAQOptions.from_dict` for a whole ``oaq:`` section.
        """
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


def _preset_init(init: Any) -> Any:
    """``OAQConfig.__init__`` that first fills in what its ``preset`` sets and the call does not give (only
    the call knows which keys were given; the dataclass defaults are indistinguishable from given values)."""
    names = [f.name for f in dataclasses.fields(OAQConfig)]

    @functools.wraps(init)
    def __init__(self: OAQConfig, *args: Any, **kwargs: Any) -> None:
        given = dict(zip(names, args))
        given.update(kwargs)
        init(self, **with_preset(given))
    return __init__


OAQConfig.__init__ = _preset_init(OAQConfig.__init__)


@dataclass
class ExportConfig:
    """Files written next to ``quantized.pth``.

    Args:
        onnx: Also write ``quantized.onnx`` (:func:`oaq_plugin.export_onnx`: standard ONNX ops, int8 products
            where the grids are on an int8 integer lattice, dynamic height and width).
    """

    onnx: bool = False


@dataclass
class RunOptions:
    """How a run executes, beside the method: none of these changes the quantized parameters.

    Read by the runs of the adapters and the CLI (:func:`oaq_plugin.experiment.run_experiment`), not by
    ``quantize()``; a resumed run may change them.

    Args:
        backend: How the quantized layers run at validation: ``auto`` (triton on CUDA, reference
            otherwise), ``triton``, ``triton_int8`` (int8 kernels for layers on an integer lattice),
            ``reference``, ``fake``, or ``onnxruntime`` (the network exported to ``quantized.onnx`` and run by
            ONNX Runtime on the CPU). ``kernel`` is its deprecated old name.
        resume: Continue an interrupted run from its saved state (as BasicSR's ``--auto_resume`` does).
            A run stopped by SIGINT/SIGTERM saves its state at the next safe point; the resumed run ends
            with the parameters an uninterrupted one would have, and is refused if the method's options
            (:class:`OAQConfig`), the weights or the calibration data changed.
        tile: Tiled validation of large images.
        analysis: Optional analyses written next to the results.
        export: Files written next to ``quantized.pth`` (``export: {onnx: true}``: ``quantized.onnx``).
    """

    backend: str = field(default='auto', metadata=_choice(*BACKENDS))
    resume: bool = False
    tile: TileConfig = field(default_factory=TileConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        _validate(self, 'oaq')

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> 'RunOptions':
        """Build from the run's keys of an option-file section, rejecting unknown keys and bad values."""
        return _from_dict(cls, options or {}, 'oaq')

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


RUN_OPTION_KEYS = tuple(f.name for f in dataclasses.fields(RunOptions))
# Old key -> current key; the old one is still read, with a warning.
DEPRECATED_KEYS = {'kernel': 'backend'}


@dataclass
class OAQOptions:
    """The whole ``oaq:`` section of an option file: the method (:class:`OAQConfig`) and the run (:class:`RunOptions`).

    Args:
        method: What the method reads.
        run: How the run executes.
    """

    method: OAQConfig = field(default_factory=OAQConfig)
    run: RunOptions = field(default_factory=RunOptions)

    @classmethod
    def from_dict(cls, section: Optional[Mapping[str, Any]]) -> 'OAQOptions':
        """Split an ``oaq:`` section into the method's and the run's options, each validated.

        The deprecated ``kernel`` is read as ``backend``, with a ``FutureWarning``.
        """
        if section is None:
            section = {}
        if not isinstance(section, Mapping):
            raise ConfigError(f'oaq: expected a mapping of options, got {type(section).__name__} {section!r}')
        section = dict(section)
        for old, new in DEPRECATED_KEYS.items():
            if old not in section:
                continue
            if new in section:
                raise ConfigError(f"oaq: both '{new}' and its deprecated old name '{old}' are given; keep '{new}'")
            # Attributed to this line, so that a run that reads its section twice (checks, then the run)
            # shows it once.
            warnings.warn(f"oaq.{old} is deprecated: it is now called oaq.{new} (same values)", FutureWarning)
            section[new] = section.pop(old)
        run = {key: section.pop(key) for key in RUN_OPTION_KEYS if key in section}
        return cls(OAQConfig.from_dict(section), RunOptions.from_dict(run))

    @classmethod
    def coerce(cls, value: Union['OAQOptions', OAQConfig, Mapping[str, Any], None]) -> 'OAQOptions':
        """Accept options, a method config (default run options), a section mapping or ``None`` (defaults)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, OAQConfig):
            return cls(method=value)
        if value is None or isinstance(value, Mapping):
            return cls.from_dict(value)
        raise ConfigError(f'oaq: expected OAQOptions, an OAQConfig or a mapping, got {type(value).__name__}')

    def to_dict(self) -> Dict[str, Any]:
        """The ``oaq:`` section (every key), in the order of the shipped option files: scalars, then sections."""
        scalars: Dict[str, Any] = {}
        sections: Dict[str, Any] = {}
        for part in (self.method, self.run):
            for key, value in part.to_dict().items():
                (sections if _is_section(type(part), key) else scalars)[key] = value
        return {**scalars, **sections}


def _is_section(cls: type, key: str) -> bool:
    hint = _type_hints(cls).get(key)
    return hint is not None and dataclasses.is_dataclass(hint)


def _type_hints(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type, options: Mapping[str, Any], where: str) -> Any:
    if not isinstance(options, Mapping):
        raise ConfigError(f'{where}: expected a mapping of options, got {type(options).__name__} {options!r}')
    if cls is OAQConfig:
        # Before the sections become config objects, so that a preset's section is merged key by key.
        options = with_preset(options, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _type_hints(cls)
    kwargs: Dict[str, Any] = {}
    for key, value in options.items():
        if key not in fields and cls is OAQConfig and (key in RUN_OPTION_KEYS or key in DEPRECATED_KEYS):
            raise ConfigError(
                f"{where}.{key} is a run option ({', '.join(RUN_OPTION_KEYS)}: how a run executes), not part of the "
                "method's config (OAQConfig) that quantize() takes; give it in an option file's oaq: section, to "
                'OAQHook(oaq=...) or to run_experiment (OAQOptions.from_dict splits a whole section)'
                + ('; after quantize(), to_backend(model, backend) chooses the backend'
                   if key in ('backend', *DEPRECATED_KEYS) else ''))
        if key not in fields:
            known = list(fields) + (list(RUN_OPTION_KEYS) if cls is OAQConfig else [])
            raise ConfigError(f"{where}: unknown key '{key}'{closest(key, known)}; valid keys: "
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
            # Sections may be given as mappings, as in the option file (or None: the defaults).
            if value is None or isinstance(value, Mapping):
                value = _from_dict(hint, value or {}, name)
                setattr(obj, f.name, value)
            elif not isinstance(value, hint):
                raise ConfigError(f'{name}: expected a mapping of options (or a {hint.__name__}), got '
                                  f'{type(value).__name__} {value!r}')
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
