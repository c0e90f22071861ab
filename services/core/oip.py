"""The `oip` model kind's arguments: how an objective's features become an Open Inference
Protocol (KServe V2) tensor, and which output tensor holds the score.

A deployment of kind `oip` is served by an OIP v2 gRPC server that runs elsewhere (MLServer,
KServe, Triton): `endpoint` says where, and the runner calls `ModelInfer` on it
(`services/runner/oip_client.py`). Its `args`:

    model_name:    the model's name on that server (required)
    model_version: the version to call; empty lets the server choose
    inputs:        the feature names, in the order of the tensor's columns (required)
    input_name:    the input tensor's name (default "input-0")
    datatype:      FP64 (default) or FP32
    output:        the output tensor whose first value per row is the score (required)
    raw:           send the tensor as raw little-endian bytes (`raw_input_contents`) instead
                   of typed contents (default false)

A burst of B tasks is one tensor of shape [B, len(inputs)]. Each name is looked up in the
task's features, then in its subject state; the value must be a finite number (a bool
counts as 0 or 1).

The mesh file (`services/core/mesh.py`) and the control plane's validation
(`services/control/validation.py`) check a deployment with `oip_problems`, and the runner
parses the same model, so a configuration that passed is one the runner can serve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

OIP_KIND = "oip"
DEFAULT_INPUT_NAME = "input-0"

Datatype = Literal["FP64", "FP32"]


class OipArgs(BaseModel):
    """The `args` of a deployment of kind `oip` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(min_length=1)
    model_version: str = ""
    inputs: list[str] = Field(min_length=1)
    input_name: str = Field(default=DEFAULT_INPUT_NAME, min_length=1)
    datatype: Datatype = "FP64"
    output: str = Field(min_length=1)
    raw: bool = False

    @field_validator("inputs")
    @classmethod
    def _distinct_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name:
                raise ValueError("a feature name must not be empty")
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"each feature goes into one column: {repeated} listed twice")
        return value


def oip_problems(
    endpoint: str, command: Sequence[str], args: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """What is wrong with an `oip` deployment, as (field path relative to the deployment,
    description): `endpoint`, `command`, `args.<field>`. Empty when it can be served."""
    out: list[tuple[str, str]] = []
    if not endpoint:
        out.append(
            (
                "endpoint",
                "an oip deployment calls an Open Inference Protocol server that runs "
                "elsewhere: its endpoint (host:port) is required",
            )
        )
    if command and not endpoint:
        # With an endpoint, the rule for every deployment says it (give one of the two).
        out.append(("command", "an oip deployment is served at its endpoint, not by a command"))
    try:
        OipArgs.model_validate(dict(args))
    except ValidationError as err:
        for error in err.errors():
            out.append((_args_path(error["loc"]), _message(error)))
    return out


def _args_path(loc: tuple[int | str, ...]) -> str:
    path = "args"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _message(error: Any) -> str:
    if error["type"] == "missing":
        return "is required"
    if error["type"] == "extra_forbidden":
        return "is not an argument of the oip kind"
    return str(error["msg"]).removeprefix("Value error, ")
