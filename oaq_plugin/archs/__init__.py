"""Pretrained lightweight SR architectures of the model zoo, in torch only (no BasicSR import here)."""
from oaq_plugin.archs.carn_arch import CARNM
from oaq_plugin.archs.fsrcnn_arch import FSRCNN, FSRCNNLuma
from oaq_plugin.archs.imdn_arch import IMDN
from oaq_plugin.archs.pan_arch import PAN
from oaq_plugin.archs.rfdn_arch import RFDN
from oaq_plugin.archs.zoo import ZOO, ZOO_ARCHS, ZooEntry, build_zoo_model, get_zoo_entry, load_zoo_state_dict

__all__ = [
    'CARNM', 'FSRCNN', 'FSRCNNLuma', 'IMDN', 'PAN', 'RFDN', 'ZOO', 'ZOO_ARCHS', 'ZooEntry', 'build_zoo_model',
    'get_zoo_entry', 'load_zoo_state_dict'
]
