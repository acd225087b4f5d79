"""Q-network: a transformers Llama causal LM whose LM-head logits of the action tokens are the Q-values.

Two ways to get one (DESIGN.md §1):

* from a config (the default, small enough for a CPU): the online network is trained in full and the target
  network is a full-parameter copy;
* from a local pretrained directory or ``.gguf`` file (``path``, read by ``icrl_fast.model.pretrained``; nothing is
  downloaded): the base weights are frozen and two PEFT IA3 adapters on ``k_proj``, ``v_proj`` and ``down_proj``
  are added, ``default`` (online, trained) and ``delayed`` (target, kept in fp32).

``hidden(input_ids)`` returns final hidden states (after the last norm); the Q-values at a position are
``hidden @ head_weight[action_ids].T``. No new head is added.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from icrl_fast.model.attention import apply_liger, attn_implementation
from icrl_fast.model.factored_embedding import FactoredEmbedding
from icrl_fast.model.kv_cache import CACHE_ARG
from icrl_fast.model.pretrained import load_model
from icrl_fast.model.same_state_memory import MEMORY_DIM, SameStateMemory

IA3_MODULES = ["k_proj", "v_proj", "down_proj"]


@dataclass
class ModelConfig:
    """The Q-network."""

    path: str | None = field(default=None, metadata={"help": "local pretrained Llama directory or .gguf file (IA3 "
                                                             "adapters; a .gguf needs the gguf package); default: a "
                                                             "small model built from this config"})
    hidden_size: int = field(default=128, metadata={"help": "width of the from-scratch model"})
    layers: int = field(default=4, metadata={"help": "transformer blocks of the from-scratch model"})
    heads: int = field(default=4, metadata={"help": "attention heads of the from-scratch model"})
    kv_heads: int | None = field(default=None, metadata={"help": "key/value heads of the from-scratch model "
                                                                 "(grouped-query attention; a divisor of heads, e.g. "
                                                                 "Llama-3.1-8B's 8 for 32; the KV cache shrinks by "
                                                                 "kv_heads/heads); default: heads"})
    intermediate_size: int = field(default=384, metadata={"help": "MLP width of the from-scratch model"})
    max_positions: int = field(default=8192, metadata={"help": "longest context (RoPE positions)"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32 or bfloat16"})
    attention: str = field(default="auto", metadata={"help": "auto (flash-attn for a bf16 model on CUDA, else SDPA), "
                                                             "sdpa, eager, flash_attention_2"})
    liger: bool = field(default=False, metadata={"help": "apply Liger RMSNorm/RoPE/SwiGLU kernels (CUDA only)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    factored_embedding: bool = field(default=True, metadata={"help": "embed a format's factored tokens (step) as the "
                                                                     "sum of their factors' embeddings; false: one "
                                                                     "embedding per token id (an ablation)"})
    memory: bool = field(default=False, metadata={"help": "add a hard-wired same-state head to the embedding (step "
                                                          "formats): per decision, what each action did from this "
                                                          "cell earlier in the context (icrl_fast.model."
                                                          "same_state_memory)"})
    memory_forget: bool = field(default=False, metadata={"help": "the same-state memory empties its counts at a "
                                                                 "surprise (an action's outcome from a cell differs "
                                                                 "from its latest there: on these deterministic maps, "
                                                                 "a changed map)"})


SHARD_NEEDS_PRETRAINED = ("--parallel fsdp shards a pretrained model (--model PATH); a from-scratch model fits one "
                          "device: use --parallel ddp")


class QNetwork(nn.Module):
    """Online and target networks around one transformers Llama (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, action_ids, device: str = "cpu", seed: int = 0,
                 token_factors=None):
        """``token_factors``: int ``[vocab_size, F]`` (a format's, e.g. the step format's): a from-scratch model then
        embeds a token as the sum of its factors' embeddings (``FactoredEmbedding``)."""
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
        if dtype is None:
            raise ValueError(f"model dtype must be float32 or bfloat16, got {cfg.dtype!r}")
        attn = attn_implementation(device, cfg.attention, dtype)
        self.register_buffer("action_ids", torch.as_tensor(action_ids, dtype=torch.long), persistent=False)
        self.pretrained = cfg.path is not None
        self.memory = (SameStateMemory(token_factors, forget=cfg.memory_forget)
                       if cfg.memory and token_factors is not None else None)
        if self.pretrained:
            if token_factors is not None or cfg.memory:
                raise ValueError("a pretrained model (--model PATH) keeps its own embeddings: use the paper format, "
                                 "not one with factored tokens (step), and no --model.memory")
            if cfg.kv_heads is not None:
                raise ValueError("kv_heads shapes a from-scratch model; a pretrained one (--model PATH) brings its own "
                                 "num_key_value_heads: leave kv_heads unset")
            base = load_model(cfg.path, dtype=dtype, attn_implementation=attn)  # a directory or a .gguf file
            if base.config.vocab_size < vocab_size:
                raise ValueError(f"the model's vocabulary ({base.config.vocab_size}) is smaller than the format's "
                                 f"({vocab_size}): use the model's own tokenizer (--data.tokenizer)")
            from peft import IA3Config, get_peft_model

            ia3 = IA3Config(target_modules=IA3_MODULES, feedforward_modules=["down_proj"], task_type="CAUSAL_LM")
            self.model = get_peft_model(base, ia3, adapter_name="default")
            self.model.add_adapter("delayed", ia3)
            for name, p in self.model.named_parameters():
                if ".delayed" in name:
                    p.data = p.data.float()  # the target adapter is kept in fp32
            self._ia3_pairs = self._adapter_pairs()
            with torch.no_grad():
                for online, target in self._ia3_pairs:
                    target.copy_(online)
            self.model.set_adapter("default")
            self.target = None
        else:
            kv_heads = cfg.heads if cfg.kv_heads is None else cfg.kv_heads
            if kv_heads < 1 or cfg.heads % kv_heads:
                raise ValueError(f"kv_heads must divide heads (each key/value head serves heads/kv_heads query "
                                 f"heads), got heads={cfg.heads}, kv_heads={cfg.kv_heads}: use e.g. kv_heads=1 or "
                                 f"leave it unset (= heads)")
            torch.manual_seed(seed)  # initialisation is part of the seeded state
            conf = LlamaConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                               num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                               num_key_value_heads=kv_heads, max_position_embeddings=cfg.max_positions,
                               tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
            self.model = LlamaForCausalLM._from_config(conf, attn_implementation=attn, dtype=dtype)
            if token_factors is not None:
                if len(token_factors) != vocab_size:
                    raise ValueError(f"token_factors needs one row per token ({vocab_size}), got {len(token_factors)}")
                self.model.model.embed_tokens = FactoredEmbedding(token_factors, cfg.hidden_size,
                                                                  conf.initializer_range, dtype,
                                                                  memory_dim=MEMORY_DIM if cfg.memory else 0)
            elif cfg.memory:
                raise ValueError("--model.memory reads a step format's factored tokens: use --data.format step or "
                                 "step-grid with --model.factored_embedding true")
            self.target = copy.deepcopy(self.model).requires_grad_(False)
        # Liger on this model's modules only (the online net, and the target copy of a from-scratch model)
        targets = [self.target] if self.target is not None else []
        self.liger = apply_liger(cfg.liger, device, [self._backbone(False), *targets])
        if cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self._sharded: list[nn.Module] = []  # the FSDP2 units, once ``shard`` ran
        self.to(device)

    def shard(self, mesh) -> None:
        """FSDP2: shard a pretrained model's decoder layers (base weights and both IA3 adapters) and its embeddings
        and final norm over ``mesh``; the LM head stays whole on every process (frozen; the fused loss reads it
        directly). Gradients of the online adapter are reduce-scattered by FSDP2; the Polyak update and AdamW work
        shard by shard. A from-scratch model is small enough for data parallelism (``--parallel ddp``)."""
        if not self.pretrained:
            raise ValueError(SHARD_NEEDS_PRETRAINED)
        from torch.distributed.fsdp import fully_shard

        backbone = self._backbone(False)
        self._sharded = [*backbone.layers, backbone]  # each keeps its dtypes (bf16 base, fp32 target adapter)
        for module in self._sharded:
            fully_shard(module, mesh=mesh)
        self._ia3_pairs = self._adapter_pairs()  # FSDP2 replaced the parameters with sharded ones

    @property
    def sharded(self) -> bool:
        return bool(self._sharded)

    def gather(self) -> None:
        """Undo the sharding for inference (a collective: every process calls it): each process then holds the
        whole model and may run it alone (the evaluation on rank 0)."""
        for module in self._sharded:
            module.set_reshard_after_forward(False)
            module.unshard()

    def _adapter_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        params = dict(self.model.named_parameters())
        return [(p, params[n.replace(".default", ".delayed")]) for n, p in params.items() if ".ia3_l.default" in n]

    @property
    def num_layers(self) -> int:
        cfg = self.model.get_base_model().config if self.pretrained else self.model.config
        return int(cfg.num_hidden_layers)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        if self.pretrained:
            return [p for p, _ in self._ia3_pairs]
        return list(self.model.parameters())

    def _backbone(self, target: bool):
        if self.pretrained:
            return self.model.get_base_model().model
        return (self.target if target else self.model).model

    def head_weight(self, target: bool = False) -> torch.Tensor:
        """The LM head ``[V, d]`` of the online (or target) network."""
        if self.pretrained:
            return self.model.get_base_model().lm_head.weight
        return (self.target if target else self.model).lm_head.weight

    def hidden(self, input_ids: torch.Tensor, *, target: bool = False, memory: torch.Tensor | None = None,
               **kwargs) -> torch.Tensor:
        """Final hidden states ``[B, L, d]`` (after the last norm) of the online or target network.

        Extra keyword arguments (``attention_mask``, ``position_ids``, the cache under ``kv_cache.CACHE_ARG``,
        ``use_cache``) go to the transformers model; with ``return_output=True`` the model output is returned instead.

        ``memory``: a model with the same-state memory (``ModelConfig.memory``) needs its features ``[B, L,
        MEMORY_DIM]`` of ``input_ids``: the training batches carry them (``ProtocolSource(memory=...)``), a cached call
        that feeds only a context's new tokens must give them (``MemoryStream.tails``: the rollout engine's). Left
        out, they are computed here from ``input_ids`` copied to the host (a host sync; right only when every row is a
        whole context from its start).
        """
        return_output = kwargs.pop("return_output", False)
        if self.memory is not None:
            if memory is None:
                if kwargs.get(CACHE_ARG) is not None:
                    raise ValueError("a cached call of a model with the same-state memory feeds only the new tokens: "
                                     "pass memory= their features (MemoryStream.tails)")
                memory = torch.from_numpy(self.memory.features(input_ids.cpu().numpy())).to(input_ids.device)
            kwargs["inputs_embeds"] = self._backbone(target).embed_tokens(input_ids, memory=memory)
            input_ids = None
        elif memory is not None:
            raise ValueError("memory features were given to a model without the same-state memory")
        if self.pretrained and target:
            self.model.set_adapter("delayed")
            try:
                out = self._backbone(True)(input_ids=input_ids, **kwargs)
            finally:
                self.model.set_adapter("default")
        else:
            out = self._backbone(target)(input_ids=input_ids, **kwargs)
        return out if return_output else out.last_hidden_state

    def q_values(self, hidden: torch.Tensor, target: bool = False) -> torch.Tensor:
        """Q of every action: ``hidden [..., d] @ head[action_ids].T`` -> ``[..., A]`` (fp32)."""
        w = self.head_weight(target)[self.action_ids]
        return hidden.float() @ w.float().T

    @torch.no_grad()
    def polyak_update(self, tau: float) -> None:
        """target <- tau * online + (1 - tau) * target: two foreach ops over all the parameters (the per-tensor
        ``mul_``/``add_`` they replace, bit for bit; tested), on the device, reading nothing back."""
        if self.pretrained:
            pairs = self._ia3_pairs
        else:
            pairs = list(zip(self.model.parameters(), self.target.parameters()))
        targets = [t for _, t in pairs]
        torch._foreach_mul_(targets, 1.0 - tau)
        torch._foreach_add_(targets, [o.to(t.dtype) for o, t in pairs], alpha=tau)

    def train_state(self) -> dict[str, torch.Tensor]:
        """Tensors that define the networks' learned state (for checkpoints)."""
        if self.pretrained:
            return {n: p.detach() for n, p in self.model.named_parameters() if ".ia3_l." in n}
        state = {f"online.{k}": v for k, v in self.model.state_dict().items()}
        state.update({f"target.{k}": v for k, v in self.target.state_dict().items()})
        return state

    def save_adapters(self, path, state: dict[str, torch.Tensor] | None = None) -> None:
        """PEFT ``save_pretrained`` of both IA3 adapters: ``default`` (online) in ``path``, ``delayed`` (target) in
        ``path/delayed`` -- loadable by any PEFT user with ``PeftModel.from_pretrained(base, path)``. ``state``:
        the adapters' whole tensors by parameter name (``train_state`` gathered), for a sharded model."""
        if not self.pretrained:
            raise ValueError("only a pretrained model (--model PATH) has IA3 adapters to save")
        self.model.save_pretrained(str(path), selected_adapters=["default", "delayed"], state_dict=state)

    def load_adapters(self, path) -> None:
        """Load adapters written by ``save_adapters`` (PEFT's own state-dict loader), keeping the target in fp32."""
        from pathlib import Path

        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        for name, folder in (("default", path), ("delayed", path / "delayed")):
            file = folder / "adapter_model.safetensors"
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing: not an adapter folder written by save_adapters")
            result = set_peft_model_state_dict(self.model, load_file(str(file)), adapter_name=name)
            if result.unexpected_keys:
                raise ValueError(f"{file} does not fit this model: unexpected {result.unexpected_keys[:3]}")
        self.model.set_adapter("default")

    def load_train_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.pretrained:
            from icrl_fast.distributed import like

            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, v in state.items():
                    params[n].copy_(like(v, params[n]))
            return
        self.model.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("online.")})
        self.target.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("target.")})
