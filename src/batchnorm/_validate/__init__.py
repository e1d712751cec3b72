"""Input checks shared by every module: the one place where error messages are written.

Each message says what was expected, what arrived, and what to do about it. One module per
topic; every check is imported here, so callers write ``_validate.name``.
"""

from batchnorm._validate.conformance import *  # noqa: F403
from batchnorm._validate.distributed import *  # noqa: F403
from batchnorm._validate.domain import *  # noqa: F403
from batchnorm._validate.kernels import *  # noqa: F403
from batchnorm._validate.layer import *  # noqa: F403
from batchnorm._validate.model import *  # noqa: F403
from batchnorm._validate.parallel import *  # noqa: F403
from batchnorm._validate.precise import *  # noqa: F403
from batchnorm._validate.saved import *  # noqa: F403
from batchnorm._validate.variants import *  # noqa: F403
