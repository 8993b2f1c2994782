"""Training-time attention choice for organisms: each layer of the Llama organism runs an attnlab method.

``ModelConfig.attention`` is the per-layer plan: one method name per layer (``()``, the default, keeps
the plain Llama model and its SDPA attention, the path every other organism uses). ``ModelConfig.
attention_params`` maps a method name to its parameters (``{"sliding_window": {"window": 64}}``), the
same for every layer running that method. :func:`uniform` and :func:`hybrid` build plans.

Why an adapter and not ``attnlab.use``: ``attnlab.use`` routes a model's attention calls through attnlab
methods, but it passes no tensor inputs (its Runtime calls every method with q, k, v alone), so it cannot
run ``gated_delta`` (``beta`` required) or ``gla`` (``g`` required); and a decode step of a linear method
there needs the method's decode state machinery. So every layer that is not plain SDPA gets a
:class:`MethodAttention` (a ``LlamaAttention`` subclass: same q/k/v/o projections and parameter names,
same initial weights) that calls ``attnlab.prepare(method, causal=True, **params)`` itself, with the
tensor inputs produced by small per-layer modules. All architectures, softmax included, then train through
the same code, which is what a comparison needs.

Conventions of :class:`MethodAttention`:

- Softmax-family layers (``softmax``, ``sliding_window``) apply RoPE to q and k, as the Llama layer does.
  Linear layers (``lightning``, ``gated_delta``, ``based``, ``linear``, ``gla``) do not: their recurrences
  carry position through decay or order (as in Gated DeltaNet, Based, Lightning/TransNormer).
- Tensor inputs (:data:`INPUT_MAKERS`; checked against ``attnlab.get(name).inputs``):
  ``gated_delta``: ``beta = sigmoid(x W_beta)`` (B, H, N) and one log-decay per head and token
  ``g = logsigmoid(x W_g + b_g)`` (B, H, N, 1), ``b_g`` initialised to 3 (decay ~0.95), as Gated DeltaNet's
  gates; ``gla``: ``g = logsigmoid(x W_g + b_g) / 16`` per channel (B, H, N, D), GLA's low-rank-free form.
  A method with a required tensor input that has no maker here is refused when the config is validated.
  ``lightning``'s optional ``decay`` is left to its default (ALiBi slopes); ``linear``'s maps are absent
  (identity).
- Output norm (``ModelConfig.linear_output_norm``, default True): the layers of :data:`OUTPUT_NORM`
  (``lightning``, ``gated_delta``, ``gla``: recurrences with no normaliser) put a per-head RMSNorm (learned
  gain, initialised to 1, eps 1e-5) on the attention output before ``o_proj``, as fla's GatedDeltaNet and
  GLA layers (``o_norm``) and TransNormer's NormAttention (lightning) do. Without it the output of a
  gated_delta layer is tiny at initialisation (q, k L2-normalised, scaled by 1/sqrt(D), state written
  with beta ~0.5) and the layer did not learn MQAR at width 64 (0.04 / 0.03 / 0.02 at 4 / 8 / 16 pairs
  after 600 CPU steps); with it, 0.97 / 0.83 / 0.48 after 250 steps (see
  ``benchmarks/results/cpu-2026-11-23-s3/gated-delta-width64/``). fla's optional output gate
  (``FusedRMSNormGated``) is not added.
- ``based`` runs its Taylor mixer on q and k mapped to ``BASED_FEATURE_DIM`` (16) dimensions by one
  learned (D, 16) matrix per layer (Based projects q/k to a 16-dim feature space; at D = 32 the Taylor map
  would have 1 + 32 + 1024 features per head).
- Decoding with a KV cache (``use_cache=True``, as :func:`attnlab.organisms.evaluate.greedy` does) is exact
  but not recurrent: softmax-family layers attend from the new queries to the cached keys (causal,
  bottom-right); linear layers keep their q/k/v and input history on the cache object and re-run the
  method over the whole prefix, returning the new rows. The recurrent state that an inference engine
  would carry instead is what :func:`state_bytes` counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from attnlab.organisms.errors import ConfigError

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from attnlab.organisms.config import ModelConfig

#: methods whose layers use RoPE and a KV cache
SOFTMAX_FAMILY = ("softmax", "sliding_window")
#: linear (recurrent-state) methods the adapter runs
LINEAR_FAMILY = ("lightning", "gated_delta", "based", "linear", "gla")
SUPPORTED = SOFTMAX_FAMILY + LINEAR_FAMILY
#: the tensor inputs each method gets from :class:`MethodAttention`'s per-layer modules
INPUT_MAKERS: dict[str, tuple[str, ...]] = {"gated_delta": ("beta", "g"), "gla": ("g",)}
#: the backend a method runs with on CPU tensors (the default dispatch picks FlexAttention for no-grad
#: calls there, which compiles again for every decode length and has no CPU backward)
CPU_BACKENDS: dict[str, str] = {"sliding_window": "sdpa_mask"}
#: linear methods whose layers get a per-head output RMSNorm (``ModelConfig.linear_output_norm``)
OUTPUT_NORM = ("lightning", "gated_delta", "gla")
#: epsilon of that norm (fla's norm_eps default)
OUTPUT_NORM_EPS = 1e-5
#: q/k feature dimension of ``based`` layers
BASED_FEATURE_DIM = 16
#: the attribute of a transformers cache that holds linear layers' history during decoding
_HISTORY = "_attnlab_organism_history"


def uniform(method: str, layers: int) -> tuple[str, ...]:
    """The plan that runs ``method`` in every one of ``layers`` layers."""
    return (method,) * layers


def hybrid(
    linear: str, layers: int, softmax_layers: Sequence[int], softmax: str = "softmax"
) -> tuple[str, ...]:
    """A hybrid plan: ``softmax`` in the layers ``softmax_layers`` (0-based), ``linear`` in the rest."""
    bad = [i for i in softmax_layers if not 0 <= i < layers]
    if bad:
        raise ConfigError(f"hybrid softmax_layers={list(softmax_layers)}: {bad} outside 0..{layers - 1}")
    return tuple(softmax if i in set(softmax_layers) else linear for i in range(layers))


def check_plan(attention: Sequence[str], params: Mapping[str, Mapping[str, Any]], layers: int) -> None:
    """Raise :class:`ConfigError` unless ``attention`` names one supported method per layer, each with the
    tensor inputs it requires available (see :data:`INPUT_MAKERS`), and ``params`` holds valid parameters
    of methods the plan uses."""
    import attnlab
    from attnlab.errors import did_you_mean

    if not attention:
        if params:
            raise ConfigError(
                f"model attention_params={dict(params)!r} without a model attention plan: name the methods "
                "per layer (e.g. attention=['softmax', 'softmax'])"
            )
        return
    if len(attention) != layers:
        raise ConfigError(
            f"model attention={list(attention)!r} names {len(attention)} layers; the model has layers={layers}: "
            "expected one method per layer"
        )
    for i, name in enumerate(attention):
        if not isinstance(name, str) or name not in attnlab.methods():
            raise ConfigError(
                f"model attention layer {i}: unknown method {name!r}; expected one of {list(SUPPORTED)}."
                f"{did_you_mean(str(name), SUPPORTED)}"
            )
        required = [t.name for t in attnlab.get(name).inputs if t.required]
        missing = [t for t in required if t not in INPUT_MAKERS.get(name, ())]
        if missing:
            raise ConfigError(
                f"model attention layer {i}: method {name!r} requires the tensor input(s) {missing}, which the "
                f"organism adapter does not produce (it makes {dict(INPUT_MAKERS)}); expected one of "
                f"{list(SUPPORTED)}"
            )
        if name not in SUPPORTED:
            raise ConfigError(
                f"model attention layer {i}: method {name!r} is not one the organism adapter trains; expected "
                f"one of {list(SUPPORTED)} (causal self-attention with a backward on CPU)"
            )
    for name, values in params.items():
        if name not in attention:
            raise ConfigError(
                f"model attention_params names {name!r}, which no layer of attention={list(attention)!r} runs"
            )
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"model attention_params[{name!r}]={values!r}: expected an object of parameters"
            )
        try:
            attnlab.prepare(name, causal=True, **dict(values))
        except Exception as exc:  # attnlab's own message says which parameter and what is expected
            raise ConfigError(f"model attention_params[{name!r}]: {exc}") from exc


class MethodAttention(nn.Module):
    """A Llama attention layer whose attention is the attnlab method ``method`` (see the module docstring).

    Same parameters as ``LlamaAttention`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), plus the input
    makers: ``beta_proj`` / ``gate_proj`` (gated_delta, gla) and ``feature_map`` (based), and with
    ``output_norm`` (layers of :data:`OUTPUT_NORM` only) ``o_norm``, a per-head RMSNorm of the output."""

    def __init__(
        self,
        config: LlamaConfig,
        layer_idx: int,
        method: str,
        params: Mapping[str, Any],
        output_norm: bool = True,
    ) -> None:
        import attnlab

        super().__init__()
        self.config, self.layer_idx, self.method = config, layer_idx, method
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads or config.num_attention_heads)
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=config.attention_bias)
        self.rope = method in SOFTMAX_FAMILY
        #: kernel of the short convolution :func:`add_short_conv` put before this layer (0: none)
        self.input_conv = 0
        self.beta_proj: nn.Linear | None = None
        self.gate_proj: nn.Linear | None = None
        self.feature_map: nn.Parameter | None = None
        self.o_norm: nn.RMSNorm | None = None
        if output_norm and method in OUTPUT_NORM:
            self.o_norm = nn.RMSNorm(self.head_dim, eps=OUTPUT_NORM_EPS)
        if method == "gated_delta":
            self.beta_proj = nn.Linear(hidden, self.heads, bias=False)
            self.gate_proj = nn.Linear(hidden, self.heads, bias=True)
        elif method == "gla":
            self.gate_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=True)
        elif method == "based":
            self.feature_map = nn.Parameter(torch.empty(self.head_dim, BASED_FEATURE_DIM))
        self.reset_extra()
        self.op = attnlab.prepare(method, causal=True, **dict(params))
        cpu = CPU_BACKENDS.get(method)
        self.cpu_op = (
            None if cpu is None else attnlab.prepare(method, causal=True, backend=cpu, **dict(params))
        )

    def reset_extra(self) -> None:
        """Initialise the input makers (normal(0, 0.02) weights; gate biases 3: decay ~0.95 at start)."""
        for lin in (self.beta_proj, self.gate_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=0.02)
                if lin.bias is not None:
                    nn.init.constant_(lin.bias, 3.0)
        if self.feature_map is not None:
            nn.init.normal_(self.feature_map, std=self.head_dim**-0.5)

    def _inputs(self, x: Tensor) -> dict[str, Tensor]:
        b, n, _ = x.shape
        if self.method == "gated_delta":
            assert self.beta_proj is not None and self.gate_proj is not None
            beta = torch.sigmoid(self.beta_proj(x)).transpose(1, 2)  # (B, H, N)
            g = nn.functional.logsigmoid(self.gate_proj(x)).transpose(1, 2).unsqueeze(-1)  # (B, H, N, 1)
            return {"beta": beta, "g": g}
        if self.method == "gla":
            assert self.gate_proj is not None
            g = nn.functional.logsigmoid(self.gate_proj(x)) / 16
            return {"g": g.view(b, n, self.heads, self.head_dim).transpose(1, 2)}
        return {}

    def _run(self, q: Tensor, k: Tensor, v: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
        if self.feature_map is not None:
            q, k = q @ self.feature_map, k @ self.feature_map
        op = self.cpu_op if self.cpu_op is not None and q.device.type == "cpu" else self.op
        out = op(q, k, v, **inputs)
        out = out if isinstance(out, Tensor) else out.out
        return out if self.o_norm is None else self.o_norm(out)

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Any = None,
        past_key_values: Any = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        """(B, N, hidden) -> ((B, N, hidden), None), as ``LlamaAttention.forward``. Padding masks are not
        supported (organisms train and evaluate unpadded rows); a 2-D mask with a zero is refused. The KV
        cache comes as ``cache`` (transformers >= 5.24) or ``past_key_values`` (before)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        if cache is not None:
            past_key_values = cache

        if (
            isinstance(attention_mask, Tensor)
            and attention_mask.dtype == torch.bool
            and not bool(attention_mask.all())
        ):
            raise ConfigError(
                f"layer {self.layer_idx} ({self.method}): padded batches are not supported by the organism "
                "attention adapter; pass unpadded rows"
            )
        if past_key_values is not None and self.input_conv:
            raise ConfigError(
                f"layer {self.layer_idx} ({self.method}): cached decoding is not supported with the short input "
                f"convolution (kernel {self.input_conv}) of add_short_conv; run full forward passes instead"
            )
        b, n, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            assert position_embeddings is not None
            cos, sin = position_embeddings
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
        inputs = self._inputs(hidden_states)
        if past_key_values is not None:
            k_all, v_all = past_key_values.update(k, v, self.layer_idx)
        else:
            k_all, v_all = k, v
        if self.rope or k_all.shape[2] == n:  # softmax family (causal, bottom-right), or a prefill
            out = self._run(q, k_all, v_all, inputs)
        else:  # a linear layer's decode step: re-run over the prefix (exact), keep the new rows
            history = getattr(past_key_values, _HISTORY, None)
            if history is None:
                history = {}
                setattr(past_key_values, _HISTORY, history)
            past = history.get(self.layer_idx)
            if past is None or past[0].shape[2] + n != k_all.shape[2]:
                raise ConfigError(
                    f"layer {self.layer_idx} ({self.method}): a decode step needs the queries and inputs of the "
                    "prefix, kept from the prefill on this cache; prefill with this model and cache first"
                )
            q_all = torch.cat([past[0], q], 2)
            ins = {key: torch.cat([past[1][key], t], 2) for key, t in inputs.items()}
            out = self._run(q_all, k_all, v_all, ins)[:, :, -n:]
            q, inputs = q_all, ins
        if past_key_values is not None and not self.rope:
            history = getattr(past_key_values, _HISTORY, None)
            if history is None:
                history = {}
                setattr(past_key_values, _HISTORY, history)
            history[self.layer_idx] = (q.detach(), {key: t.detach() for key, t in inputs.items()})
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        return self.o_proj(out), None


def apply(model: LlamaForCausalLM, cfg: ModelConfig) -> LlamaForCausalLM:
    """Replace the attention of every layer of ``model`` by the method ``cfg.attention`` names for it
    (nothing changes when ``cfg.attention`` is empty). The q/k/v/o weights are kept; returns ``model``."""
    if not cfg.attention:
        return model
    check_plan(cfg.attention, cfg.attention_params, cfg.layers)
    layers = model.model.layers
    for i, (layer, method) in enumerate(zip(layers, cfg.attention, strict=True)):
        old = layer.self_attn
        new = MethodAttention(
            model.config, i, method, cfg.attention_params.get(method, {}), cfg.linear_output_norm
        )
        new.load_state_dict(old.state_dict(), strict=False)
        layer.self_attn = new.to(next(old.parameters()).device)
    model.config.use_cache = False  # training needs no cache; greedy decoding asks for one explicitly
    return model


class ShortConv(nn.Module):
    """``norm`` followed by a causal depthwise convolution over the sequence, added to its input:
    ``y = h + conv(h)``, ``h = norm(x)``, each channel mixing itself over the last ``kernel`` tokens
    (positions before the first are zeros). Zoology's MQAR models and Based / Gated DeltaNet put such a
    short convolution before the sequence mixer; it gives every position its previous tokens directly,
    the step that associative recall otherwise has to learn through a previous-token attention head."""

    def __init__(self, norm: nn.Module, hidden: int, kernel: int) -> None:
        super().__init__()
        self.norm, self.kernel = norm, kernel
        self.conv = nn.Conv1d(hidden, hidden, kernel, groups=hidden, padding=kernel - 1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, hidden) -> (B, N, hidden)."""
        h = self.norm(x)
        return h + self.conv(h.transpose(1, 2))[..., : h.shape[1]].transpose(1, 2)


def add_short_conv(model: LlamaForCausalLM, kernel: int) -> LlamaForCausalLM:
    """Put a :class:`ShortConv` of ``kernel`` taps (>= 2) after the input norm of every decoder layer of
    ``model``, whose layers must all be :class:`MethodAttention` (an organism built with an attention plan).
    Trains and runs full forward passes; cached decoding is refused (the convolution keeps no cache) and
    the checkpoint functions do not know the convolution (it is for in-process experiments such as the
    architecture comparison). Returns ``model``."""
    if not isinstance(kernel, int) or isinstance(kernel, bool) or kernel < 2:
        raise ConfigError(f"add_short_conv kernel={kernel!r}: expected an integer >= 2")
    layers = model.model.layers
    plain = [i for i, layer in enumerate(layers) if not isinstance(layer.self_attn, MethodAttention)]
    if plain:
        raise ConfigError(
            f"add_short_conv: layers {plain} are plain Llama layers; expected a model built with an attention "
            "plan (ModelConfig.attention), every layer a MethodAttention"
        )
    for layer in layers:
        norm = layer.input_layernorm
        device = next(norm.parameters()).device
        layer.input_layernorm = ShortConv(norm, model.config.hidden_size, kernel).to(device)
        layer.self_attn.input_conv = kernel
    return model


def layer_methods(model: nn.Module) -> list[str]:
    """The attention each decoder layer of ``model`` runs: the method of a :class:`MethodAttention`, else
    ``"sdpa"`` (a plain Llama layer)."""
    return [
        layer.self_attn.method if isinstance(layer.self_attn, MethodAttention) else "sdpa"
        for layer in model.model.layers  # type: ignore[union-attr]
    ]


def state_bytes(
    method: str,
    params: Mapping[str, Any],
    context: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int = 4,
) -> int:
    """Bytes one layer keeps per sequence to decode the next token after ``context`` tokens.

    softmax: the KV cache, ``2 * kv_heads * context * head_dim`` elements; sliding_window: the same over
    ``min(window, context)`` keys; lightning, gated_delta, gla: the state S (heads, D, D); linear: S and
    the normaliser z (heads, D) (normalize=True, default); based (Taylor, q/k at ``BASED_FEATURE_DIM``):
    S (heads, F, D) and z (heads, F) with F = 1 + 16 + 256. Elements of ``dtype_bytes`` each (default 4:
    fp32, the dtype organisms train in and that the linear states use)."""
    import attnlab

    p: Any = (
        attnlab.prepare(method, causal=True, **dict(params)).params if params else attnlab.get(method).params
    )
    d = head_dim
    if method == "softmax":
        elements = 2 * kv_heads * context * d
    elif method == "sliding_window":
        elements = 2 * kv_heads * min(int(p.window), context) * d
    elif method in ("lightning", "gated_delta", "gla"):
        elements = heads * d * d
    elif method == "linear":
        elements = heads * d * d + (heads * d if p.normalize else 0)
    elif method == "based":
        if p.mixer == "window":
            elements = 2 * kv_heads * min(int(p.window), context) * d
        else:
            f = 1 + BASED_FEATURE_DIM + BASED_FEATURE_DIM**2
            elements = heads * f * d + heads * f
    else:
        raise ConfigError(f"state_bytes: method {method!r}; expected one of {list(SUPPORTED)}")
    return int(elements * dtype_bytes)


def plan_state_bytes(cfg: ModelConfig, context: int, dtype_bytes: int = 4) -> list[int]:
    """:func:`state_bytes` of every layer of the organism ``cfg`` (a plain Llama counts as softmax)."""
    plan = cfg.attention or uniform("softmax", cfg.layers)
    return [
        state_bytes(
            m, cfg.attention_params.get(m, {}), context, cfg.heads, cfg.kv_heads, cfg.head_dim, dtype_bytes
        )
        for m in plan
    ]


def describe(attention: Sequence[str]) -> str:
    """A short label of a plan: ``"gated_delta x3 + softmax x1 (layers 1)"`` style."""
    if not attention:
        return "softmax (sdpa)"
    kinds = sorted(set(attention), key=attention.index)
    if len(kinds) == 1:
        return f"{kinds[0]} x{len(attention)}"
    parts = [f"{m} x{attention.count(m)}" for m in kinds]
    soft = [str(i) for i, m in enumerate(attention) if m in SOFTMAX_FAMILY]
    return " + ".join(parts) + (f" (softmax-family layers {','.join(soft)})" if soft else "")


def load_organism(path: str | Path, device: str = "cpu") -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load an organism folder written by ``attnlab train`` with its attention plan (``training.json``'s
    ``model.attention``), in eval mode: the layers are rebuilt as :class:`MethodAttention` and every weight
    (input makers included) comes from ``model.safetensors``. A folder without a plan loads through
    :func:`attnlab.organisms.checkpoint.load_organism`. (That function alone would drop the input makers'
    weights and run every layer as softmax with RoPE: use this one for adapted organisms.)"""
    import dataclasses

    from attnlab.organisms import checkpoint as ckpt
    from attnlab.organisms.config import TrainConfig
    from attnlab.organisms.tokenizer import load_tokenizer
    from attnlab.organisms.train import _load_adapted

    folder = ckpt.resolve(path)
    stored = ckpt.read_state(folder)["config"]
    if not stored.get("model", {}).get("attention"):
        return ckpt.load_organism(folder, device=device)
    if "linear_output_norm" not in stored["model"]:  # saved before the option: its layers have no o_norm
        stored = {**stored, "model": {**stored["model"], "linear_output_norm": False}}
    cfg = dataclasses.replace(TrainConfig.from_dict(stored), device=device)
    return _load_adapted(cfg, folder).eval(), load_tokenizer(folder)


def mqar_batch(
    generator: torch.Generator,
    batch: int,
    length: int,
    pairs: int,
    keys: tuple[int, int],
    values: tuple[int, int],
    pad: int,
    ignore: int = -100,
) -> tuple[Tensor, Tensor]:
    """A batch of zoology-style multi-query associative recall (MQAR) rows in token space.

    Each row is ``pairs`` key-value pairs ``k1 v1 k2 v2 ... kP vP`` (keys distinct, drawn from the token ids
    ``keys[0] <= id < keys[1]``; values drawn with replacement from ``values[0] <= id < values[1]``), then
    every key once more in a random order, each followed by its value (``... kq vq ...``), then ``pad``
    up to ``length``. The labels are ``ignore`` except at the query keys, whose label is their value (the
    next token): the model is scored only on recalling values (zoology's MQAR; one token per key and per
    value, so no tokenisation stands between a key and its value). Returns (input ids, labels), each
    (batch, length) int64. Deterministic in ``generator``'s state."""
    if not isinstance(pairs, int) or pairs < 1 or 4 * pairs > length:
        raise ConfigError(f"mqar_batch pairs={pairs!r} at length={length}: expected 1 <= pairs <= length / 4")
    for name, (lo, hi) in (("keys", keys), ("values", values)):
        if not 0 <= lo < hi:
            raise ConfigError(f"mqar_batch {name}={(lo, hi)}: expected a token id range 0 <= lo < hi")
    if keys[1] - keys[0] < pairs:
        raise ConfigError(f"mqar_batch keys={keys} holds {keys[1] - keys[0]} ids; expected >= pairs={pairs}")
    if not (keys[1] <= values[0] or values[1] <= keys[0]):
        raise ConfigError(f"mqar_batch keys={keys} and values={values} overlap: expected disjoint ranges")
    k = torch.rand(batch, keys[1] - keys[0], generator=generator).argsort(-1)[:, :pairs] + keys[0]
    v = torch.randint(values[0], values[1], (batch, pairs), generator=generator)
    order = torch.rand(batch, pairs, generator=generator).argsort(-1)
    qk, qv = k.gather(1, order), v.gather(1, order)
    x = torch.full((batch, length), pad, dtype=torch.long)
    x[:, : 2 * pairs : 2], x[:, 1 : 2 * pairs : 2] = k, v
    x[:, 2 * pairs : 4 * pairs : 2], x[:, 2 * pairs + 1 : 4 * pairs : 2] = qk, qv
    y = torch.full((batch, length), ignore, dtype=torch.long)
    y[:, 2 * pairs : 4 * pairs : 2] = qv
    return x, y
