"""The FineTuneJob API: models (the source of truth), loading, CRD generation, shared contracts."""

from kubetune.api.load import (
    SpecError,
    dump_spec,
    load_finetunejob,
    parse_finetunejob,
    parse_spec,
    read_spec_arg,
)
from kubetune.api.models import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    Dataset,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "Dataset",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "SpecError",
    "dump_spec",
    "load_finetunejob",
    "parse_finetunejob",
    "parse_spec",
    "read_spec_arg",
]
