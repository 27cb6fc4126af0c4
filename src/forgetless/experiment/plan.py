"""``forgetless plan CONFIG``: what a study can resolve, before any compute.

For the test sizes a config will score (limits applied, the same items the runner scores), the
smallest difference between two methods that the paired test of the report (exact McNemar on the
same items) detects with 80% power at the 5% level, per task and pooled: the new tasks (final
average) and the general suite (general score; in retention that is the same difference divided by
the base model's general score). The paired test's power depends on how often two methods disagree
on an item (``discordance``); 0.3 is a typical share between a forgetting and a non-forgetting
method in docs/results.md, and a smaller share makes smaller differences resolvable.
"""

from __future__ import annotations

from typing import Any

from forgetless.evaluation.uncertainty import minimum_detectable_difference


def plan(config: Any, discordance: float = 0.3, power: float = 0.8) -> list[dict[str, Any]]:
    """Rows ``{"what", "items", "detectable"}`` (the detectable difference as a share, 0-1)."""
    from forgetless.experiment.runner import load_tasks, scored_tasks

    tasks, general = load_tasks(config)
    scored = scored_tasks(tasks, config)
    rows = []

    def add(what: str, items: int) -> None:
        rows.append(
            {
                "what": what,
                "items": items,
                "detectable": minimum_detectable_difference(items, discordance, power=power),
            }
        )

    for task in scored:
        add(task.name, len(task.test))
    add("new tasks, pooled (final average)", sum(len(task.test) for task in scored))
    for task in general:
        add(f"general: {task.name}", len(task.test))
    if general:
        add("general suite, pooled (general score, retention)", sum(len(task.test) for task in general))
    return rows
