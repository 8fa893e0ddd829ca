"""What a rehearsal reports: each phase's time, the write freeze, the events replayed, the workload, parity and the
workload's check; for a rehearsal on the site's test databases (`configured`) also sync's lag under the workload and
what stays in the databases afterwards. Counts and timings only: never a row value."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Phase:
    name: str
    seconds: float
    detail: str = ""


@dataclass
class RehearsalReport:
    ok: bool = False
    scale: float = 0.0
    rows: int = 0
    bytes: int = 0
    phases: list[Phase] = field(default_factory=list)
    freeze_seconds: float | None = None
    events_applied: int = 0
    parity: dict[str, Any] = field(default_factory=dict)
    workload: dict[str, Any] = field(default_factory=dict)
    missing_studies: int = 0
    problems: list[str] = field(default_factory=list)
    databases: tuple[str, str] | None = None
    kept: bool = False
    mode: str = "synthetic"
    """"synthetic": throwaway databases and the synthetic PACS (`rehearse.run`); "configured": the databases of the
    configuration (`rehearse.configured.run`)."""
    source: str = ""
    """configured: the legacy database, host:port/dbname."""
    target: str = ""
    workload_kind: str = "pacs"
    workload_text: str = ""
    """configured: the workload's own summary (what it committed, what the schema refused)."""
    workload_check: dict[str, Any] = field(default_factory=dict)
    workload_check_text: str = ""
    sync: dict[str, Any] = field(default_factory=dict)
    """configured: sync following under the workload (events, batches, lag mean, worst and last)."""
    notes: list[str] = field(default_factory=list)
    """configured: what stays in the two databases afterwards."""
    config: str | None = None
    """With --keep: a configuration file naming the kept databases (for `migrator console`, `status`, `audit`)."""
    lag: dict[str, Any] = field(default_factory=dict)
    """The lag sync sampled (the samples `migrator console` charts): count, median and worst seconds."""
    report: str | None = None
    """The HTML report `migrator report` writes from the control schema at the end (its JSON beside it)."""

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["phases"] = [p.__dict__ for p in self.phases]
        return d

    def render_text(self) -> str:
        if self.mode == "configured":
            return self._render_configured()
        lines = [f"rehearsal at scale {self.scale}: {self.rows} rows, {self.bytes / 1e6:.1f} MB", ""]
        lines += [f"  {p.name:<10} {p.seconds:9.2f}s  {p.detail}" for p in self.phases]
        lines.append("")
        if self.freeze_seconds is not None:
            lines.append(f"write freeze (client-visible window): {self.freeze_seconds:.2f}s")
        lines.append(f"events replayed: {self.events_applied}")
        if self.lag.get("samples"):
            lines.append(f"lag sampled by sync: {self.lag['samples']} samples, median {self.lag['median']:.2f}s, "
                         f"worst {self.lag['worst']:.2f}s")
        w = self.workload
        if w:
            lines.append(f"workload: {w.get('committed', 0)} transactions committed, "
                         f"{w.get('frozen_rejections', 0)} rejected by the freeze, "
                         f"{w.get('rolled_back_on_purpose', 0)} rolled back on purpose")
        lines.append(f"parity: {self.parity.get('summary', '?')}; studies missing on target: {self.missing_studies}")
        if self.kept and self.databases:
            lines.append(f"kept databases: {self.databases[0]} (legacy), {self.databases[1]} (new)")
        if self.kept and self.config:
            lines.append(f"look at them: migrator --config {self.config} console   (or status, audit)")
        if self.report:
            lines.append(f"report (charts, the prediction for cutover night, history): {self.report}")
        for p in self.problems:
            lines.append(f"PROBLEM: {p}")
        lines.append("RESULT: " + ("OK — nothing lost, nothing doubled" if self.ok else "FAILED"))
        return "\n".join(lines)

    def _render_configured(self) -> str:
        lines = [f"rehearsal on the test databases {self.source} (legacy) -> {self.target} (new): {self.rows} rows, "
                 f"{self.bytes / 1e6:.1f} MB copied", ""]
        lines += [f"  {p.name:<11} {p.seconds:9.2f}s  {p.detail}" for p in self.phases]
        lines.append("")
        if self.freeze_seconds is not None:
            lines.append(f"write freeze (client-visible window): {self.freeze_seconds:.2f}s")
        lines.append(f"events replayed: {self.events_applied}")
        if self.workload_text:
            lines.append(self.workload_text)
        lines.append(f"parity: {self.parity.get('summary', '?')}")
        if self.workload_check_text:
            lines.append(f"workload check: {self.workload_check_text}")
        lines += self.notes
        if self.report:
            lines.append(f"report (charts, the prediction for cutover night, history): {self.report}")
        for p in self.problems:
            lines.append(f"PROBLEM: {p}")
        lines.append("RESULT: " + ("OK — nothing lost, nothing doubled" if self.ok else "FAILED"))
        return "\n".join(lines)
