"""Which port module computes what which reference module computes.

Modules are paired through the weight key maps (`sdxl_ms.weights.keymap`), not through names
typed by hand: a port module's parameters (MindSpore's gamma/beta/embedding_table spellings
read as torch's) map to diffusers parameters, and the diffusers module that holds them is its
counterpart (`input_blocks.4.1.transformer_blocks.0.attn2` holds what
`down_blocks.1.attentions.0.transformer_blocks.0.attn2` holds). The port's modules are any
MindSpore Cells (stock `nn` layers or a module system of the port's own), walked through their
public children. Three rules settle the cases where the parameters alone are ambiguous:
  - a module whose parameters all sit in one child wraps it (sgm's `Downsample` around `op`,
    `GEGLU` around `proj`): its counterpart is the parent of the child's counterpart;
  - a counterpart that is a plain container (`ff.net`, `encoder.layers`) is replaced by the
    module that holds it;
  - sequences of numbered layers (sgm's `TimestepEmbedSequential`, `in_layers`, a CellList)
    are not paired: their layers are, and a reference block does not split where sgm's
    sequence does.
What a module is (its kind, which names its bounds) comes from the reference side
(`module_kinds`); how the port lays out its inputs and output is learned in the free run
(`module_layouts`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .module_kinds import kind_of

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
    """One port module and its reference counterpart. `kind` says what the module is
    (`module_kinds`, from the reference's side)."""

    module: str      # sgm name without the network prefix: "input_blocks.4.1.transformer_blocks.0.attn2"
    reference: str   # diffusers name with its component: "unet/down_blocks.1.attentions..."
    kind: str
    port_path: str   # full sgm path in the port model: "model.diffusion_model.input_blocks..."

    def to_dict(self) -> Dict[str, str]:
        return {"module": self.module, "reference": self.reference, "kind": self.kind,
                "port_path": self.port_path}

    @classmethod
    def from_dict(cls, d) -> "ModulePair":
        return cls(d.get("module", ""), d["reference"], d["kind"], d.get("port_path", ""))


def core_pair(attention: ModulePair) -> ModulePair:
    """The row of an attention module's core (`module_kinds.ATTENTION_PARTS`): named after the
    module, of the core's kind."""
    from .module_kinds import core_kind

    return ModulePair(f"{attention.module} (core)", f"{attention.reference} (core)",
                      core_kind(attention.kind), attention.port_path)


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


def sgm_names(cfg) -> Dict[str, List[str]]:
    """sgm parameter name -> the diffusers parameter names (component-prefixed) it holds."""
    from sdxl_ms.weights.keymap import pipeline_rules

    out: Dict[str, List[str]] = {}
    for rule in pipeline_rules(cfg):
        for name in rule.sgm:
            out.setdefault(name, []).extend(rule.diffusers)
    return out


@lru_cache(maxsize=4)
def _layout_of(checkpoint: str):
    from sdxl_ms.weights.checkpoint import open_checkpoint
    from sdxl_ms.weights.loader import infer_preset

    return infer_preset(open_checkpoint(Path(checkpoint)))


def layout_config(checkpoint) -> object:
    """The SDXL layout (`sdxl_ms.config.SDXLConfig`: widths, depths) of `checkpoint`, which the
    key maps take."""
    return _layout_of(str(checkpoint))


def _network_root(roots: Sequence[Tuple[str, object]], prefix: str,
                  rename: Callable[[str], str]) -> Optional[Tuple[str, object]]:
    """(port path, cell) of the network at the sgm path `prefix` ("model.diffusion_model."),
    found below one of the stage's roots under its renamed path, or None."""
    want = prefix.rstrip(".")
    for root_prefix, root in roots:
        if rename(root_prefix) == want:
            return root_prefix, root
        for name, cell in root.cells_and_names():
            if name and rename(f"{root_prefix}.{name}") == want:
                return f"{root_prefix}.{name}", cell
    return None


@dataclass
class Pairing:
    """The stage's port modules paired with captured reference modules, and what stayed alone:
    port modules owning weights the key maps give no counterpart (a name that differs from
    sgm's), captured modules no port module computes (both listed in the report, never dropped
    silently). Port modules whose counterpart the stage does not run (the VAE's encoder when
    decoding) are neither."""

    pairs: List[ModulePair]
    port_alone: List[str]
    reference_alone: List[str]


def pair_with_port(roots: Sequence[Tuple[str, object]], cfg, stage: str,
                   captured: Dict[str, str], containers: Sequence[str] = (),
                   rename: Optional[Callable[[str], str]] = None) -> Pairing:
    """Pair the port's modules of `stage` (`roots`: (sgm path, cell) from the contract's
    `cells()`) with the captured reference modules (`captured`: reference name -> kind), through
    the parameter names each module owns and the key maps; `containers` are the reference's
    plain containers (a counterpart there is the module that holds it); `rename` maps a full
    port name that differs from sgm's (`module_names`). Pairs come in the port's module-tree
    order, each with its sgm name and its port path."""
    from sdxl_ms.weights.mindspore_ckpt import canonical_name

    to_diffusers = sgm_names(cfg)
    rename = rename or (lambda name: name)
    containers = set(containers)
    pairs: List[ModulePair] = []
    port_alone: List[str] = []
    used = set()
    for prefix, component in STAGE_NETWORKS[stage]:
        found = _network_root(roots, prefix, rename)
        if found is None:
            continue
        used.add(found[0].split(".")[0])
        at, network = found[0] + ".", found[1]  # the network's port path
        cells = [(name, cell) for name, cell in network.cells_and_names() if name]
        counterpart: Dict[str, str] = {}
        for name, cell in reversed(cells):  # children before parents
            mapped = [d for rel, _ in cell.parameters_and_names()
                      for d in to_diffusers.get(canonical_name(rename(f"{at}{name}.{rel}")),
                                                [])]
            if not mapped:
                continue
            path = _common_prefix([_parent(d) for d in mapped])
            children = [counterpart.get(f"{name}.{child}") for child in _direct_children(cell)]
            if path in children:  # a wrapper around one child
                path = _parent(path)
            if path in containers:
                path = _parent(path)
            counterpart[name] = path
        for name, _ in cells:
            sgm = rename(at + name)
            if sgm in PARAMETER_FREE:
                counterpart[name] = PARAMETER_FREE[sgm]
        for name, cell in cells:
            if _is_sequence(cell):
                continue
            ref = counterpart.get(name)
            sgm = rename(at + name)
            if ref in captured:
                pairs.append(ModulePair(sgm[len(prefix):] if sgm.startswith(prefix) else sgm,
                                        ref, captured[ref], at + name))
            elif ref is None and list(cell.get_parameters(expand=False)):
                port_alone.append(sgm)  # weights the key maps know no counterpart of
    # a root in which no sgm network was found: its names are not sgm's at all
    port_alone += [f"{root} (no sgm network under it)" for root, _ in roots
                   if root.split(".")[0] not in used]
    seen, unique = set(), []
    for p in pairs:  # one port module per reference module (the first, outermost)
        if p.reference not in seen:
            seen.add(p.reference)
            unique.append(p)
    alone = [name for name in captured if name not in seen]
    return Pairing(unique, port_alone, alone)


def cell_at(root, path: str):
    """The cell at a dotted path below `root` ("input_blocks.4.1"), through each cell's
    public children (`name_cells`), as `cells_and_names` names them."""
    cell = root
    for part in path.split("."):
        children = cell.name_cells()
        if part not in children:
            raise KeyError(f"no module {path!r}: {type(cell).__name__} has no child {part!r}")
        cell = children[part]
    return cell


def _is_sequence(cell) -> bool:
    """A container of numbered layers and no weights of its own (sgm's `nn.Sequential` and
    `TimestepEmbedSequential`, a `CellList`, a `SequentialCell`): not paired, its layers are,
    and a reference block does not split where the sequence does."""
    children = list(cell.name_cells())
    return (bool(children) and all(name.isdigit() for name in children)
            and not list(cell.get_parameters(expand=False)))


def _direct_children(cell) -> List[str]:
    """Child modules as named in `cells_and_names`, a sequence's layers keyed through it
    ("in_layers.0"), the sequence itself left out (it is not paired)."""
    out = []
    for name, child in cell.name_cells().items():
        if _is_sequence(child):
            out += [f"{name}.{sub}" for sub in _direct_children(child)]
        elif child is not None:
            out.append(name)
    return out


def reference_containers(modules: Dict[str, object]) -> List[str]:
    """The names of torch's plain containers (ModuleList, Sequential, ModuleDict) among the
    reference's modules: a port module's counterpart there is the module holding it."""
    import torch

    kinds = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)
    return [name for name, module in modules.items() if isinstance(module, kinds)]


def captured_kinds(modules: Dict[str, object]) -> Dict[str, str]:
    """Reference name -> kind for every reference module compared on its own
    (`module_kinds.kind_of`), in the reference's module order."""
    out = {}
    for name, module in modules.items():
        kind = kind_of(name, type(module).__name__)
        if kind is not None:
            out[name] = kind
    return out


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

