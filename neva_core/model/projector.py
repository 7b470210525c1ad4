"""The vision-language projector: CLIP features [.., C] -> LLM embeddings [.., H].

Two types, as LLaVA-1.5 builds them (`mm_projector_type`):

    linear        nn.Linear(C, H)                                  state keys: weight, bias
    mlp2x_gelu    Sequential(Linear(C, H), GELU(), Linear(H, H))   state keys: 0.weight, 0.bias, 2.weight, 2.bias

The state-dict keys are LLaVA's `model.mm_projector.*` with that prefix removed, so LLaVA's
`mm_projector.bin` loads as it is. Hugging Face LLaVA names the two linears `linear_1` / `linear_2`
(see `hf_projector_tensors`).
"""

from __future__ import annotations

import torch
from torch import nn

from neva_core.errors import NevaError

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


def build_projector(projector_type: str, vision_hidden: int, llm_hidden: int) -> nn.Module:
    """A freshly initialised projector (nn.Linear's default init, as LLaVA's)."""
    if projector_type == "linear":
        return nn.Linear(vision_hidden, llm_hidden)
    if projector_type == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_hidden, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
    raise NevaError(f"projector type {projector_type!r} is not supported; choose one of {', '.join(PROJECTOR_TYPES)}")


def projector_type_of(state: dict[str, torch.Tensor], source: str) -> str:
    """Which projector a state dict (prefix removed) holds, from its keys."""
    keys = set(state)
    if keys == {"weight", "bias"}:
        return "linear"
    if keys == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        return "mlp2x_gelu"
    raise NevaError(f"{source} holds projector tensors {sorted(keys)}, neither a linear nor an mlp2x_gelu projector")


def hf_projector_tensors(projector_type: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector as HF LLaVA's `multi_modal_projector` (linear_1, act, linear_2) holds it.

    HF LLaVA always has two linears; a `linear` projector becomes linear_1 = ours, an identity activation
    (`projector_hidden_act: "linear"`) and linear_2 = the identity, which computes exactly the same map.
    """
    if projector_type == "mlp2x_gelu":
        return {"linear_1.weight": state["0.weight"], "linear_1.bias": state["0.bias"],
                "linear_2.weight": state["2.weight"], "linear_2.bias": state["2.bias"]}
    hidden = state["weight"].shape[0]
    return {"linear_1.weight": state["weight"], "linear_1.bias": state["bias"],
            "linear_2.weight": torch.eye(hidden, dtype=state["weight"].dtype),
            "linear_2.bias": torch.zeros(hidden, dtype=state["bias"].dtype)}


def hf_projector_activation(projector_type: str) -> str:
    return "gelu" if projector_type == "mlp2x_gelu" else "linear"


def projector_from_hf(state: dict[str, torch.Tensor], activation: str, source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(projector type, our state) from HF LLaVA's `multi_modal_projector.*` tensors (prefix removed)."""
    if activation != "gelu":
        raise NevaError(f"{source}: projector_hidden_act={activation!r}; only LLaVA's gelu MLP projector is imported")
    expected = {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    if set(state) != expected:
        raise NevaError(f"{source}: projector tensors {sorted(state)} are not {sorted(expected)}")
    return "mlp2x_gelu", {"0.weight": state["linear_1.weight"], "0.bias": state["linear_1.bias"],
                          "2.weight": state["linear_2.weight"], "2.bias": state["linear_2.bias"]}
