"""UMEC: FLOPs-budgeted joint feature selection, embedding-dimension reduction and neuron pruning."""

from torchrec_prune.pruners.umec.groups import GroupLayer
from torchrec_prune.pruners.umec.pruner import UMECConfig, UMECPruner, find_layers
from torchrec_prune.pruners.umec.resource import ResourceModel

__all__ = ["GroupLayer", "ResourceModel", "UMECConfig", "UMECPruner", "find_layers"]
