"""Models by name (`zoo`) and the checkpoint / published-model format (`checkpoints`)."""

from .zoo import check_model_name, count_params, create_model, list_models  # noqa: F401
