"""``SuperResolutionModel``: the smallest mmengine model around an SR network (its ``generator``)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from mmengine.structures import BaseDataElement
from torch import nn

from ..errors import ConfigError, DataError
from .checkpoint import load_checkpoint_file

MODES = ('tensor', 'predict', 'loss')


def build_generator(generator: Union[nn.Module, Mapping[str, Any]]) -> nn.Module:
    """The SR network from a module or a ``dict(type=..., **kwargs)``.

    ``type`` is looked up in mmengine's MODELS registry first, then among BasicSR's architectures
    (and the plugin's), so a BasicSR ``network_g`` section works unchanged.
    """
    if isinstance(generator, nn.Module):
        return generator
    if not isinstance(generator, Mapping) or 'type' not in generator:
        raise ConfigError(f"generator: expected an nn.Module or a dict with 'type', got {generator!r}")
    options = dict(generator)
    kind = options['type']
    if isinstance(kind, type):
        options.pop('type')
        return kind(**options)
    if MODELS.get(kind) is not None:
        return MODELS.build(options)
    # Importing basicsr needs the torchvision alias; build_arch installs it before the import.
    from ..archs.registry import build_arch
    try:
        return build_arch(options)
    except KeyError:
        raise ConfigError(f"generator: no architecture named '{kind}' in mmengine's MODELS or BasicSR's "
                          'ARCH_REGISTRY') from None


def load_generator_weights(network: nn.Module, path: str, param_key: Optional[str] = 'params',
                           strict: bool = True) -> None:
    """Load a plain state dict (BasicSR ``params``/``params_ema`` or an mmengine ``state_dict``) weights-only.

    Raises:
        DataError: The file is missing or unreadable, or its tensors do not fit the network.
    """
    state = load_checkpoint_file(path, map_location='cpu')
    if isinstance(state, dict) and param_key is not None and param_key in state:
        state = state[param_key]
    elif isinstance(state, dict) and 'state_dict' in state:
        state = {k[len('generator.'):]: v for k, v in state['state_dict'].items() if k.startswith('generator.')}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"checkpoint {path} holds no state dict under '{param_key}'")
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}
    expected = set(network.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if strict and (missing or unexpected):
        raise DataError(f'checkpoint {path} does not match {type(network).__name__}: {len(missing)} missing keys '
                        f'(first: {missing[:3]}), {len(unexpected)} unexpected keys (first: {unexpected[:3]}); '
                        'is it a checkpoint of another architecture or scale?')
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError as error:
        raise DataError(f'checkpoint {path} does not fit {type(network).__name__}: {error}') from None


@MODELS.register_module()
class SuperResolutionModel(BaseModel):
    """An SR network for mmengine's loops: ``predict`` returns samples with ``pred_img`` (C, H, W).

    Args:
        generator: The SR network, or its config (see :func:`build_generator`).
        pretrained: A checkpoint of the network, loaded weights-only at construction.
        param_key: Key of the state dict inside ``pretrained`` (BasicSR: ``params`` or ``params_ema``).
        strict_load: Require the checkpoint's keys to match the network exactly.
        data_preprocessor: Defaults to :class:`~oaq_plugin.mmengine_plugin.SRDataPreprocessor`.
        init_cfg: mmengine's weight initialization config.
    """

    def __init__(self, generator: Union[nn.Module, Mapping[str, Any]], pretrained: Optional[str] = None,
                 param_key: Optional[str] = 'params', strict_load: bool = True,
                 data_preprocessor: Optional[Union[dict, nn.Module]] = None, init_cfg: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor or dict(type='SRDataPreprocessor'), init_cfg=init_cfg)
        # Kept as given so a quantized export can record how to rebuild the float skeleton.
        self.generator_cfg = dict(generator) if isinstance(generator, Mapping) else None
        self.generator = build_generator(generator)
        self.pretrained = pretrained
        if pretrained:
            load_generator_weights(self.generator, pretrained, param_key, strict_load)

    def forward(self, inputs: torch.Tensor, data_samples: Optional[Sequence[BaseDataElement]] = None,
                mode: str = 'tensor') -> Union[torch.Tensor, List[BaseDataElement], Dict[str, torch.Tensor]]:
        if mode not in MODES:
            raise ConfigError(f"SuperResolutionModel: unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
        output = self.generator(inputs)
        if mode == 'tensor':
            return output
        if mode == 'loss':
            return dict(loss=F.l1_loss(output, self._ground_truth(data_samples, output)))
        predictions = []
        for index in range(output.shape[0]):
            sample = data_samples[index].clone() if data_samples else BaseDataElement()
            sample.pred_img = output[index]
            predictions.append(sample)
        return predictions

    @staticmethod
    def _ground_truth(data_samples: Optional[Sequence[BaseDataElement]], output: torch.Tensor) -> torch.Tensor:
        if not data_samples or any('gt_img' not in sample for sample in data_samples):
            raise DataError("SuperResolutionModel: training needs samples with 'gt_img' (a dataset with HR images)")
        target = torch.stack([sample.gt_img for sample in data_samples]).to(output)
        if target.shape != output.shape:
            raise DataError(f'SuperResolutionModel: output {tuple(output.shape)} and ground truth '
                            f'{tuple(target.shape)} differ in shape; are the crops of LR and HR aligned?')
        return target
