"""batchnorm: the reference Batch Normalization in pure NumPy.

The kernels (``forward_train``, ``forward_eval``, ``backward``) hold all the math; the
``BatchNorm`` layer keeps parameters and running statistics (``BatchRenorm`` is its Batch
Renormalization variant); ``precise_bn`` recomputes
population statistics after training. Submodules ``gradcheck`` and ``fold`` hold the gradient
checks and the folding of BatchNorm into a preceding linear or conv layer; ``conformance`` the
named cases and tolerances that ``gradcheck.check_kernels`` runs your kernels on;
``distributed`` holds synchronized BatchNorm across workers (MPI or threads; mpi4py is
imported only by MPIGroup).
"""

from batchnorm import conformance, distributed, fold, gradcheck
from batchnorm._model import batchnorms, freeze_all, load_model_state_dict, model_state_dict
from batchnorm.domain import DomainBatchNorm
from batchnorm.functional import BatchNormCache, backward, forward_eval, forward_train
from batchnorm.layer import BatchNorm
from batchnorm.precise import PopulationStats, precise_bn
from batchnorm.renorm import BatchRenorm

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormCache",
    "BatchRenorm",
    "DomainBatchNorm",
    "PopulationStats",
    "__version__",
    "backward",
    "batchnorms",
    "conformance",
    "distributed",
    "fold",
    "forward_eval",
    "forward_train",
    "freeze_all",
    "gradcheck",
    "load_model_state_dict",
    "model_state_dict",
    "precise_bn",
]
