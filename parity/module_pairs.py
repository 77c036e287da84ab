"""Which port module computes what which reference module computes, and how to call one on the
other's inputs.

Modules are paired through the weight key maps (`sdxl_ms.weights.keymap`), not through names
typed by hand: a port module's parameters map to diffusers parameters, and the diffusers module
that holds them is its counterpart (`input_blocks.4.1.transformer_blocks.0.attn2` holds what
`down_blocks.1.attentions.0.transformer_blocks.0.attn2` holds). Three rules settle the cases
where the parameters alone are ambiguous:
  - a module whose parameters all sit in one child wraps it (sgm's `Downsample` around `op`,
    `GEGLU` around `proj`): its counterpart is the parent of the child's counterpart;
  - a counterpart that is a plain container (`ff.net`, `encoder.layers`) is replaced by the
    module that holds it;
  - `Sequential`s (sgm's `TimestepEmbedSequential`, `in_layers`) are not paired: their layers
    are, and a reference block does not split where sgm's sequence does.

Each pair knows how to run the port module on the reference's recorded inputs (`PortCall`):
the port keeps some activations in other layouts (row-major tokens (B*L, C) where diffusers
has (B, L, C); GEGLU's output transposed; the VAE attention's q/k/v as 1x1 convolutions where
diffusers has Linears over (B, HW, C)), converted here both ways.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

# the port network of each localisable stage: (sgm prefix, diffusers component)
STAGE_NETWORKS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "conditioner": (("conditioner.embedders.0.transformer.", "text_encoder"),
                    ("conditioner.embedders.1.model.", "text_encoder_2")),
    "unet": (("model.diffusion_model.", "unet"),),
    "decode": (("first_stage_model.", "vae"),),
}
LOCATABLE_STAGES = tuple(STAGE_NETWORKS)
# parameter-free port modules have no keys to pair through: their counterparts by name
PARAMETER_FREE: Dict[str, str] = {"model.diffusion_model.time_proj": "unet/time_proj"}


@dataclass(frozen=True)
class ModulePair:
    """One port module and its reference counterpart. `kind` is the port module's class."""

    module: str      # sgm name without the network prefix: "input_blocks.4.1.transformer_blocks.0.attn2"
    reference: str   # diffusers name with its component: "unet/down_blocks.1.attentions..."
    kind: str
    port_path: str   # full sgm path in the port model: "model.diffusion_model.input_blocks..."

    def to_dict(self) -> Dict[str, str]:
        return {"module": self.module, "reference": self.reference, "kind": self.kind,
                "port_path": self.port_path}

    @classmethod
    def from_dict(cls, d) -> "ModulePair":
        return cls(d["module"], d["reference"], d["kind"], d["port_path"])


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths]
    out: List[str] = []
    for column in zip(*parts):
        if any(c != column[0] for c in column):
            break
        out.append(column[0])
    return ".".join(out)


def pair_modules(model, cfg, stage: str, reference_modules: Dict[str, object]) -> List[ModulePair]:
    """Pairs for `stage`, in the port's module-tree order. `model` is the port's whole SDXL
    (sgm names); `reference_modules` maps "component/name" to each diffusers module (its
    `named_modules`, component-prefixed), used to tell containers and existing modules."""
    from mindspore import nn

    from sdxl_ms.nn.module import Module, Network, Sequential, submodule
    from sdxl_ms.weights.keymap import pipeline_rules

    sgm_to_diffusers: Dict[str, List[str]] = {}
    for rule in pipeline_rules(cfg):
        for name in rule.sgm:
            sgm_to_diffusers.setdefault(name, []).extend(rule.diffusers)
    pairs: List[ModulePair] = []
    for prefix, component in STAGE_NETWORKS[stage]:
        root = submodule(model, prefix.rstrip("."))
        cells = [(name, cell) for name, cell in root.cells_and_names()
                 if name and isinstance(cell, Module)]
        counterpart: Dict[str, str] = {}
        for name, cell in reversed(cells):  # children before parents
            mapped = [d for rel, _ in cell.parameters_and_names()
                      for d in sgm_to_diffusers.get(f"{prefix}{name}.{rel}", [])]
            if not mapped:
                continue
            path = _common_prefix([_parent(d) for d in mapped])
            children = [counterpart.get(f"{name}.{child}") for child in _direct_children(cell)]
            if path in children:  # a wrapper around one child
                path = _parent(path)
            if isinstance(reference_modules.get(path), _reference_containers()):
                path = _parent(path)
            counterpart[name] = path
        for name, _ in cells:
            if prefix + name in PARAMETER_FREE:
                counterpart[name] = PARAMETER_FREE[prefix + name]
        for name, cell in cells:
            if (name in counterpart and not isinstance(cell, (Sequential, Network, nn.CellList))
                    and counterpart[name] in reference_modules
                    and type(cell).__name__ in PORT_CALLS):
                pairs.append(ModulePair(name, counterpart[name], type(cell).__name__,
                                        prefix + name))
    seen, unique = set(), []
    for p in pairs:  # one port module per reference module (the first, outermost)
        if p.reference not in seen:
            seen.add(p.reference)
            unique.append(p)
    return unique


def _direct_children(cell) -> List[str]:
    """Child modules as named in `cells_and_names`, a Sequential's or list's layers keyed
    through it ("in_layers.0"), the Sequential itself left out (it is not paired)."""
    from mindspore import nn

    from sdxl_ms.nn.module import Sequential

    out = []
    for name, child in cell._cells.items():
        if isinstance(child, (Sequential, nn.CellList)):
            out += [f"{name}.{sub}" for sub in _direct_children(child)]
        elif child is not None:
            out.append(name)
    return out


def _reference_containers() -> tuple:
    """torch's plain container classes (torch imported here: `parity.locate` imports without it)."""
    import torch

    return (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def reference_module_table(ref, stage: str) -> Dict[str, object]:
    """"component/name" -> module for the reference networks of `stage` (`ref` a
    `parity.reference.ReferencePipeline`; the VAE is the one that decodes, its float32 copy in
    a float16 run)."""
    out: Dict[str, object] = {}
    for _, component in STAGE_NETWORKS[stage]:
        network = ref.decoding_vae() if component == "vae" else getattr(ref.pipe, component)
        # transformers 5's CLIPTextModel holds its modules at the top while its checkpoint
        # names keep `text_model.`: name the modules as the checkpoint (and the key maps) do
        alias = ("text_model." if component.startswith("text_encoder")
                 and not hasattr(network, "text_model") else "")
        for name, module in network.named_modules():
            if name:
                out[f"{component}/{alias}{name}"] = module
    return out


# ---- calling a port module on the reference's inputs ---------------------------------------

@dataclass(frozen=True)
class PortCall:
    """How a port module kind takes the reference's inputs. `inputs` names the recorded inputs
    it needs (x, context, temb); `tokens`: the port runs it on row-major (B*L, C) tokens."""

    inputs: Tuple[str, ...] = ("x",)
    tokens: bool = False
    batch_arg: bool = False  # forward takes the batch size after the tensors


PORT_CALLS: Dict[str, PortCall] = {
    # primitives
    "Linear": PortCall(), "Conv2d": PortCall(), "GroupNorm": PortCall(), "LayerNorm": PortCall(),
    "Embedding": PortCall(), "Upsample": PortCall(), "Downsample": PortCall(),
    "SinusoidalTimesteps": PortCall(),
    # UNet
    "ResBlock": PortCall(("x", "temb")), "SpatialTransformer": PortCall(("x", "context")),
    "BasicTransformerBlock": PortCall(("x", "context"), tokens=True, batch_arg=True),
    "CrossAttention": PortCall(("x", "context"), tokens=True, batch_arg=True),
    "FeedForward": PortCall(tokens=True), "GEGLU": PortCall(tokens=True),
    # VAE
    "ResnetBlock": PortCall(), "AttnBlock": PortCall(), "MidBlock": PortCall(), "Level": PortCall(),
    "Decoder": PortCall(),
    # text encoders
    "CLIPTextEmbeddings": PortCall(),
    "CLIPEncoderLayer": PortCall(tokens=True, batch_arg=True),
    "ResidualAttentionBlock": PortCall(tokens=True, batch_arg=True),
    "CLIPAttention": PortCall(tokens=True, batch_arg=True),
    "MultiheadAttention": PortCall(tokens=True, batch_arg=True),
    "CLIPMLP": PortCall(tokens=True), "MLP": PortCall(tokens=True),
}


TOKEN_ID_INPUTS = ("Embedding", "CLIPTextEmbeddings")  # kinds whose x is token ids


def port_inputs(pair: ModulePair, module, recorded: Dict[str, np.ndarray]) -> Tuple:
    """The port module's forward arguments (after `p`) from the reference's recorded inputs,
    float ones in the dtype of the module's weights (the capture stores float32; in float16
    the reference module got float16 values, which float32 holds exactly)."""
    import mindspore as ms
    from mindspore import Tensor

    weight = next(iter(module.get_parameters()), None)
    dtype = weight.dtype if weight is not None else ms.float32

    call = PORT_CALLS[pair.kind]
    x = recorded["x"]
    batch = x.shape[0]
    args = []
    for name in call.inputs:
        value = recorded.get(name)
        if value is None:
            args.append(None)
            continue
        if call.tokens and value.ndim == 3:
            value = value.reshape(-1, value.shape[-1])
        if name == "x" and pair.kind == "Conv2d" and value.ndim == 3:
            value = value.transpose(0, 2, 1)[..., None]  # (B, L, C) as a 1-wide NCHW map
        if name == "x" and pair.kind in TOKEN_ID_INPUTS:
            args.append(Tensor(np.asarray(value).astype(np.int32)))  # ids, stored as floats
            continue
        value = Tensor(np.ascontiguousarray(value))
        args.append(value if dtype == ms.float32 else value.astype(dtype))
    if call.batch_arg:
        args.append(batch)
    return tuple(args)


def to_reference_layout(pair: ModulePair, out, shape: Tuple[int, ...],
                        is_input: bool = False) -> np.ndarray:
    """The port module's output (or, `is_input`, its main input) as the reference lays it out
    (`shape`)."""
    a = _numpy(out)
    if pair.kind == "GEGLU" and not is_input:  # transposed (inner, B*L)
        a = a.T
    elif pair.kind == "Conv2d" and len(shape) == 3:  # 1x1 conv output (B, C, L, 1) -> (B, L, C)
        a = a.reshape(a.shape[0], a.shape[1], -1).transpose(0, 2, 1)
    return np.ascontiguousarray(a.reshape(shape))


def _numpy(out) -> np.ndarray:
    if isinstance(out, (tuple, list)):
        out = out[0]
    return np.asarray(out.float().asnumpy() if hasattr(out, "asnumpy") else out, np.float32)


def run_port_module(pair: ModulePair, module, recorded: Dict[str, np.ndarray]) -> np.ndarray:
    """The port module's own output on the reference's inputs, in the reference's layout."""
    out = module.forward(module, *port_inputs(pair, module, recorded))
    return to_reference_layout(pair, out, recorded["out"].shape)


# ---- what a reference module was called with -------------------------------------------------

_X_KWARGS = ("hidden_states", "input_tensor", "sample", "input_ids", "inputs_embeds", "x")


def reference_inputs(args: Sequence, kwargs: Dict, output) -> Dict[str, object]:
    """x (the main input), context (cross-attention states), temb, out from a forward hook."""
    import torch

    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    x = tensors[0] if tensors else next((kwargs[k] for k in _X_KWARGS
                                          if isinstance(kwargs.get(k), torch.Tensor)), None)
    got = {"x": x, "context": kwargs.get("encoder_hidden_states"),
           "temb": kwargs.get("temb", tensors[1] if len(tensors) > 1 else None)}
    if hasattr(output, "sample"):
        output = output.sample
    elif isinstance(output, (tuple, list)) or hasattr(output, "to_tuple"):
        output = output[0]
    got["out"] = output
    return {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}

