"""The NeVA / LLaVA model: frozen CLIP tower -> projector -> the native tensor-parallel LLM.

Image tokens use Hugging Face LLaVA's layout: each image occupies n consecutive copies of
`image_token_id` in `input_ids` (n = vision.num_patches, CLS dropped), and the n projected features
replace the embeddings at those positions, in order. An HF LLaVA export therefore needs no rewriting.

Tensor parallelism: the LLM is split as `NevaLLM` describes. The vision tower and the projector are
replicated: every rank of a TP group holds all of their weights, receives the same images and computes
the same features. The projector's gradient is the same on every TP rank (the embedding gradient that
reaches it is already summed over the group by the first column-parallel layer), and its parameters
carry no `tensor_model_parallel` attribute, so DeepSpeed counts them once in the gradient norm.

Every row runs the vision path, text-only rows too: the splice gathers a feature for every position and
keeps only those at image tokens, so the projector is in every rank's graph whatever the batch holds
(ZeRO's gradient hooks fire on every data-parallel rank). Text-only rows carry a zero image.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from neva_core.errors import NevaError
from neva_core.model.llm import NevaLLM
from neva_core.model.vision import VisionTower

IGNORE_INDEX = -100  # the default; the data path defines its own copy (the model never imports data code)


class Stage(enum.Enum):
    """What a training stage updates. The vision tower is always frozen."""

    PRETRAIN = "pretrain"  # the projector only (LLaVA's feature alignment)
    FINETUNE = "finetune"  # the projector and the LLM

    @property
    def trains_llm(self) -> bool:
        return self is Stage.FINETUNE


class NevaModel(nn.Module):
    """CLIP tower + projector + NevaLLM on one tensor-parallel rank (the LLM's `tp_group`)."""

    def __init__(self, vision: VisionTower, projector: nn.Module, llm: NevaLLM, *, image_token_id: int,
                 projector_type: str) -> None:
        super().__init__()
        if not 0 <= image_token_id < llm.config.vocab_size:
            raise NevaError(
                f"image_token_id={image_token_id} is not a token of the LLM's vocabulary (0..{llm.config.vocab_size - 1}); "
                f"use the id of the tokenizer's image_patch token"
            )
        self.vision = vision
        self.projector = projector
        self.llm = llm
        self.image_token_id = image_token_id
        self.projector_type = projector_type

    @property
    def image_tokens(self) -> int:
        """Image tokens per image in input_ids."""
        return self.vision.num_patches

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected features [B, n, H] of images [B, 3, S, S]."""
        features = self.vision(images)
        return self.projector(features.to(self._projector_dtype()))

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings [B, T, H] with row b's image features at its image-token positions.

        images [B, 3, S, S], one per row (zeros for text-only rows, which have no image tokens);
        None skips the vision path (inference on text alone). Row b's k-th image token gets feature k
        of image b. The token counts are the data path's job (it writes n tokens per image); checking
        them here would cost a host-device sync per step.
        """
        text = self.llm.embedding(input_ids)
        if images is None:
            return text
        if images.shape[0] != input_ids.shape[0]:
            raise NevaError(f"{images.shape[0]} images for {input_ids.shape[0]} rows: pass one image per row")
        features = self.image_features(images)
        is_image = input_ids == self.image_token_id
        # For every position, the index of the image feature it would take (fixed shapes, no host sync).
        slot = (is_image.cumsum(dim=1) - 1).clamp(0, features.shape[1] - 1)
        spliced = features.gather(1, slot.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
        return torch.where(is_image.unsqueeze(-1), spliced.to(text.dtype), text)

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's logits shard [B, T, padded_vocab / tp]; attention_mask [B, T] (True = real token) as
        NevaLLM takes it (None: no padding, or right padding only, which causal attention never sees)."""
        return self.llm(inputs_embeds=self.embed(input_ids, images), attention_mask=attention_mask)

    def loss_terms(self, input_ids: torch.Tensor, images: torch.Tensor | None, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, number of supervised tokens), both 0-d tensors on the model's device.

        labels [B, T] are aligned with input_ids (HF convention: position t's label is token t, and the
        logits at t-1 predict it), ignore_index where not trained. Summing both terms over gradient
        accumulation and data-parallel ranks and dividing once gives the token-weighted mean.

        Only the positions that predict a supervised token go through the output layer and the loss: image
        tokens, prompts and padding never need logits (in pretraining two thirds of the positions and of that
        work). Selecting them reads their count back to the host once per micro batch, a small price next to
        a [B, T, vocab] matmul and softmax.
        """
        hidden = self.llm.hidden_states(inputs_embeds=self.embed(input_ids, images), attention_mask=attention_mask)
        targets = labels[:, 1:]
        supervised = targets != ignore_index
        logits = self.llm.output_logits(hidden[:, :-1][supervised])
        return self.llm.loss_terms(logits, targets[supervised], ignore_index)

    # -- stages ------------------------------------------------------------------------------------

    def _trained_modules(self, stage: Stage) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"projector": self.projector}
        if stage.trains_llm:
            modules["llm"] = self.llm
        return modules

    def trainable_parameters(self, stage: Stage) -> list[nn.Parameter]:
        """The parameters `stage` updates (what the optimizer gets)."""
        return [param for module in self._trained_modules(stage).values() for param in module.parameters()]

    def set_stage(self, stage: Stage) -> None:
        """Set requires_grad for `stage`: the vision tower never trains, the LLM only when finetuning."""
        trained = {id(param) for param in self.trainable_parameters(stage)}
        for param in self.parameters():
            param.requires_grad_(id(param) in trained)

    def parameter_summary(self, stage: Stage) -> dict[str, dict[str, int]]:
        """Trainable and frozen parameter counts per part under `stage` (the LLM's on this TP rank)."""
        trained = {id(param) for param in self.trainable_parameters(stage)}
        summary = {}
        for part in ("vision", "projector", "llm"):
            params = list(getattr(self, part).parameters())
            trainable = sum(p.numel() for p in params if id(p) in trained)
            summary[part] = {"trainable": trainable, "frozen": sum(p.numel() for p in params) - trainable}
        return summary

    def _projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype
