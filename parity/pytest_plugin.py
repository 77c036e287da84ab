"""A parity check as the porting team's own pytest tests (installed as a `pytest11` plugin).

Inactive unless `--sdxl-golden` is given. Then the session runs `sdxl-parity check` once (the
port is loaded once per process), at collection, and collects one test item per stage and
compared tensor, named `<stage>[<sampler>-step<k>-<tensor>]` (`unet[euler-step0-eps_guided]`,
`decode[probe-decoded]`), so `-k`, `-x`, `--junitxml` and `-n` (pytest-xdist) work as for any
test. Each item asserts its policy bounds; a failure reads as one paragraph (stage, step,
tensor, metric, value, bound, truth ratio, the module `--sdxl-locate` named); a waived failure
(`--sdxl-waivers`) is an xfail with the waiver's reason; a stage in which the port raised is one
failing item; each expired, stale or exceeded waiver is a failing `waivers[...]` item. The
reports are written as `sdxl-parity check` writes them (`--sdxl-report DIR`, default a
temporary folder). No conftest is needed:

    pytest --sdxl-golden golden/ --sdxl-port my_adapter:make [--sdxl-checkpoint C]
           [--sdxl-policy P] [--sdxl-waivers W] [--sdxl-locate] [--sdxl-report DIR]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest


def pytest_addoption(parser) -> None:
    group = parser.getgroup("sdxl-parity", "SDXL parity of a MindSpore port (sdxl-parity)")
    group.addoption("--sdxl-golden", default=None, metavar="DIR",
                    help="a recording (sdxl-parity record): turns the plugin on and collects "
                         "one item per stage and compared tensor")
    group.addoption("--sdxl-port", default=None, metavar="MODULE:FACTORY",
                    help="the port to check (default: the built-in sdxl_ms port)")
    group.addoption("--sdxl-checkpoint", default=None, metavar="PATH",
                    help="the port's checkpoint (default: the weights the golden names)")
    group.addoption("--sdxl-policy", default=None, metavar="TOML",
                    help="tolerance policy (default: the packaged one)")
    group.addoption("--sdxl-waivers", default=None, metavar="TOML",
                    help="known deviations: waived failures are xfail (parity/waivers.py)")
    group.addoption("--sdxl-stages", default=None, metavar="LIST",
                    help="comma-separated stages to run (default: all)")
    group.addoption("--sdxl-locate", action="store_true",
                    help="name the first divergent module of the first failing stage")
    group.addoption("--sdxl-report", default=None, metavar="DIR",
                    help="where the HTML/JSON/Markdown reports go (default: a temp folder)")


def pytest_configure(config) -> None:
    if config.getoption("sdxl_golden"):
        config.pluginmanager.register(ParitySession(config), "sdxl-parity-session")


class ParityFailure(AssertionError):
    """A compared tensor over its policy bounds."""


class ParitySession:
    """One parity check per pytest process, its results as test items."""

    def __init__(self, config):
        self.config = config
        self.report = None
        self.out: Optional[Path] = None

    def _option(self, name: str):
        return self.config.getoption(name)

    def _temporary_report_dir(self) -> Path:
        """Without --sdxl-report, the report goes under pytest's own temporary base (which
        pytest prunes to the last few runs), not a folder of its own in the temp dir."""
        factory = getattr(self.config, "_tmp_path_factory", None)
        if factory is not None:
            return factory.mktemp("sdxl-parity-report")
        import tempfile

        return Path(tempfile.mkdtemp(prefix="sdxl-parity-pytest-"))

    def _run_check(self):
        from sdxl_common.errors import InputError

        from .cli import stage_selection
        from .policy import load_policy
        from .ports import PortSpec, BUILTIN
        from .recording import Recording
        from .runner import check

        try:
            rec = Recording.load(Path(self._option("sdxl_golden")))
            spec = PortSpec.parse(self._option("sdxl_port") or BUILTIN)
            spec.resolve()
            policy = load_policy(self._option("sdxl_policy"))
            waivers = None
            if self._option("sdxl_waivers"):
                from .waivers import load_waivers

                waivers = load_waivers(self._option("sdxl_waivers"))
            stages = stage_selection(self._option("sdxl_stages"))
            report_dir = self._option("sdxl_report")
            self.out = Path(report_dir) if report_dir else self._temporary_report_dir()
            self.report = check(rec, self.out, policy=policy, port_spec=spec,
                                checkpoint=self._option("sdxl_checkpoint"), stages=stages,
                                locate=self._option("sdxl_locate"), waivers=waivers)
        except InputError as e:
            raise pytest.UsageError(f"sdxl-parity: {e}") from None

    @pytest.hookimpl(tryfirst=True)  # before -k/-m deselect, so they select among these items
    def pytest_collection_modifyitems(self, session, config, items) -> None:
        if self.report is None:
            self._run_check()
        golden = ParityGolden.from_parent(session, name="sdxl-parity", nodeid="sdxl-parity")
        items.extend(golden.items_of(self.report))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.report is not None:
            terminalreporter.write_sep("-", "sdxl-parity")
            terminalreporter.write_line(self.report.headline())
            terminalreporter.write_line(f"report: {self.out / 'index.html'}")


class ParityGolden(pytest.Collector):
    """The golden's stages and tensors as items (made from the check's report)."""

    def collect(self):  # items are made from the report, not from files
        return []

    def items_of(self, report) -> List["ParityItem"]:
        from .results import Verdict

        located = {loc["stage"]: loc for loc in report.localisation}
        out: List[ParityItem] = []
        seen: Dict[str, int] = {}
        for problem in report.waiver_problems():  # "waiver 'ID' (...) expired ..."
            name = problem.split("'")[1] if problem.count("'") >= 2 else "file"
            seen[name] = seen.get(name, 0) + 1
            suffix = "" if seen[name] == 1 else f"-{seen[name]}"
            out.append(ParityItem.from_parent(self, name=f"waivers[{name}{suffix}]",
                                              kind="waiver", message=problem))
        for stage in report.ordered_stages():
            if stage.verdict == Verdict.ERROR:
                out.append(ParityItem.from_parent(
                    self, name=f"{stage.name}[port-raised]", kind="error",
                    message=f"stage '{stage.name}': the port raised {stage.error}"))
                continue
            for t in stage.tensors:
                out.append(ParityItem.from_parent(
                    self, name=f"{stage.name}[{item_id(t.name, t.step)}]", kind="tensor",
                    stage=stage, tensor=t, located=located.get(stage.name)))
        return out


def item_id(tensor: str, step: Optional[int]) -> str:
    """`euler/eps_guided` at step 0 -> `euler-step0-eps_guided`."""
    parts = tensor.split("/")
    if step is not None:
        parts.insert(1 if len(parts) > 1 else len(parts), f"step{step}")
    return "-".join(parts)


class ParityItem(pytest.Item):
    def __init__(self, *, kind: str, message: str = "", stage=None, tensor=None,
                 located: Optional[Dict[str, Any]] = None, **kwargs):
        super().__init__(**kwargs)
        self.kind, self.message = kind, message
        self.stage, self.tensor, self.located = stage, tensor, located

    def runtest(self) -> None:
        from .results import Verdict

        if self.kind in ("waiver", "error"):
            raise ParityFailure(self.message)
        t = self.tensor
        if t.verdict == Verdict.WAIVED:
            pytest.xfail(t.reasons[0] if t.reasons else "waived")
        if t.verdict == Verdict.FAIL:
            raise ParityFailure(failure_message(self.stage, t, self.located))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ParityFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.config.getoption("sdxl_golden"), None, self.name


def failure_message(stage, t, located: Optional[Dict[str, Any]]) -> str:
    """One paragraph: where, which bound, by how much, and the module when located."""
    from .metrics import format_value

    where = f"stage '{stage.name}'" + ("" if t.step is None else f", step {t.step}")
    values = t.metrics.values()
    shown = ", ".join(f"{k} {format_value(v)}" for k, v in values.items()
                      if k in ("rel_l2", "max_abs", "cosine", "mismatch_ratio", "truth_ratio",
                               "ref_vs_truth", "port_vs_truth", "psnr_db", "mismatches"))
    bounds = ", ".join(f"{k} fail {format_value(v['fail'])}" for k, v in stage.limits.items())
    text = (f"{where}, tensor '{t.name}': {'; '.join(t.reasons) or 'verdict fail'}. "
            f"Metrics: {shown or '-'}. Policy bounds: {bounds or '-'}.")
    culprit = (located or {}).get("first_divergent_module")
    if culprit:
        judged = (f"raised {culprit['error']}" if culprit.get("error") else
                  f"{culprit['metric']} {format_value(culprit['value'])} > fail "
                  f"{format_value(culprit['bound'])}")
        text += f" First divergent module: '{culprit['module']}' ({judged})."
    elif located and located.get("note"):
        text += f" --sdxl-locate: {located['note']}."
    return text
