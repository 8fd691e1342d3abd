"""A tiny Flower app (no torch) for deployment tests: checks processes, TLS and auth only.

Copied by the tests into a temporary app directory next to a generated ``pyproject.toml``.
The ServerApp reads a JSON run file named by run config ``fedshop-config``; it checkpoints the
last finished round to ``checkpoint.json`` and resumes after it, like fedshop's real ServerApp.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server_app = ServerApp()
client_app = ClientApp()


def _write_json(path: Path, payload: object) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload), encoding="utf-8")
    os.replace(tmp, path)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    spec = json.loads(Path(str(context.run_config["fedshop-config"])).read_text())
    run_dir = Path(spec["run_dir"])
    if spec.get("fail"):
        raise RuntimeError("toy ServerApp asked to fail")
    checkpoint = run_dir / "checkpoint.json"
    done = json.loads(checkpoint.read_text())["round"] if checkpoint.exists() else 0
    deadline = time.time() + 120
    while len(list(grid.get_node_ids())) < spec["min_nodes"] and time.time() < deadline:
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    for rnd in range(done + 1, spec["rounds"] + 1):
        messages = [
            Message(
                content=RecordDict({"config": ConfigRecord({"round": rnd})}),
                dst_node_id=node,
                message_type="train",
            )
            for node in nodes
        ]
        replies = [r for r in grid.send_and_receive(messages, timeout=180) if not r.has_error()]
        if len(replies) < len(nodes):
            raise RuntimeError(f"round {rnd}: {len(replies)} of {len(nodes)} replies")
        _write_json(checkpoint, {"round": rnd})
        time.sleep(float(spec.get("round_pause", 0.0)))
    _write_json(run_dir / "result.json", {"status": "completed", "nodes": len(nodes)})


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    merchant_config = Path(str(context.node_config["merchant-config"]))
    with (merchant_config.parent / "rounds.log").open("a", encoding="utf-8") as handle:
        config = msg.content["config"]
        assert isinstance(config, ConfigRecord)
        handle.write(f"{config['round']!s}\n")
    return Message(content=RecordDict({"metrics": MetricRecord({"ok": 1.0})}), reply_to=msg)
