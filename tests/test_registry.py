"""Model registry: signed manifests, atomic registration, gate, promotion and rollback."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.canonical import canonical_json
from common.errors import ConfigError, IntegrityError, NotFoundError, StateError
from server.registry import ModelRegistry, PromotionAction, gate

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.fixture()
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def open_registry(root: Path, key: Ed25519PrivateKey) -> ModelRegistry:
    return ModelRegistry(root, signing_key=key, verify_key=key.public_key())


def weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "embedding.weight": rng.normal(size=(5, 3)).astype(np.float32),
        "head.bias": rng.normal(size=(3,)),
    }


def register(reg: ModelRegistry, seed: int, ndcg: float, parent: int | None = None) -> int:
    version = reg.register(
        weights(seed),
        parent=parent,
        round=seed,
        merchants=["m2", "m1"],
        metrics={"ndcg@10": ndcg, "loss": 1.0 - ndcg},
        privacy={"m1": 0.5, "m2": 1.25},
        now=NOW,
    )
    return version.id


def test_register_roundtrip_and_restart(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    reg = open_registry(tmp_path, key)
    first = register(reg, 1, 0.20)
    second = register(reg, 2, 0.25, parent=first)
    assert (first, second) == (1, 2)
    reopened = ModelRegistry(tmp_path, signing_key=None, verify_key=key.public_key())
    version = reopened.get(2)
    assert version.parent == 1 and version.round == 2
    assert version.merchants == ("m1", "m2")
    assert version.privacy == {"m1": 0.5, "m2": 1.25}
    assert version.metrics["ndcg@10"] == pytest.approx(0.25)
    arrays = reopened.load_arrays(2)
    for name, expected in weights(2).items():
        np.testing.assert_array_equal(arrays[name], expected)
        assert arrays[name].dtype == expected.dtype
    assert [v.id for v in reopened.list()] == [1, 2]
    with pytest.raises(ConfigError, match="signing key"):
        reopened.register(weights(3), parent=None, round=3, merchants=[], metrics={}, privacy={})


def test_register_validates_before_writing(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    reg = open_registry(tmp_path, key)
    bad = {"w": np.array([1.0, np.nan])}
    with pytest.raises(ConfigError, match="NaN"):
        reg.register(bad, parent=None, round=0, merchants=["m1"], metrics={}, privacy={"m1": 1})
    with pytest.raises(ConfigError, match="only float"):
        reg.register(
            {"w": np.arange(3)}, parent=None, round=0, merchants=[], metrics={}, privacy={}
        )
    with pytest.raises(ConfigError, match=r"\['m2'\]"):
        reg.register(
            weights(1), parent=None, round=0, merchants=["m1", "m2"], metrics={}, privacy={"m1": 1}
        )
    with pytest.raises(ConfigError, match="-1"):
        reg.register(
            weights(1), parent=None, round=0, merchants=["m1"], metrics={}, privacy={"m1": -1}
        )
    with pytest.raises(NotFoundError, match="parent version 7"):
        reg.register(weights(1), parent=7, round=0, merchants=[], metrics={}, privacy={})
    assert reg.list() == []
    assert list((tmp_path / "versions").iterdir()) == []


@pytest.mark.parametrize("step", ["after_weights", "after_manifest", "before_commit"])
def test_crash_during_register_leaves_no_version(
    tmp_path: Path, key: Ed25519PrivateKey, step: str
) -> None:
    reg = open_registry(tmp_path, key)
    register(reg, 1, 0.2)

    def crash(at: str) -> None:
        if at == step:
            raise KeyboardInterrupt(at)

    reg._fault_hook = crash
    with pytest.raises(KeyboardInterrupt):
        register(reg, 2, 0.3, parent=1)
    restarted = open_registry(tmp_path, key)
    assert [v.id for v in restarted.list()] == [1]
    again = register(restarted, 3, 0.4, parent=1)
    assert again == 2  # the id of the crashed attempt is reused, its stray files overwritten
    np.testing.assert_array_equal(restarted.load_arrays(2)["head.bias"], weights(3)["head.bias"])


def test_changed_weights_file_is_detected(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    reg = open_registry(tmp_path, key)
    register(reg, 1, 0.2)
    path = tmp_path / "versions" / "v000001.npz"
    tampered = weights(1)
    tampered["head.bias"][0] += 1e-3
    with path.open("wb") as handle:
        np.savez(handle, **tampered)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match=r"v000001\.npz changed"):
        reg.load_arrays(1)
    with pytest.raises(IntegrityError):
        reg.promote(1, reason="should refuse tampered weights")


def test_forged_manifest_is_detected(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    reg = open_registry(tmp_path, key)
    register(reg, 1, 0.2)
    path = tmp_path / "versions" / "v000001.manifest.json"
    envelope = json.loads(path.read_text())
    envelope["manifest"]["privacy"]["m2"] = 0.01  # understate a merchant's epsilon
    path.write_text(json.dumps(envelope))
    with pytest.raises(IntegrityError, match=r"v000001\.manifest\.json does not verify"):
        reg.get(1)
    # Re-signing with another key does not help either.
    forger = Ed25519PrivateKey.generate()
    envelope["signature"] = forger.sign(canonical_json(envelope["manifest"])).hex()
    path.write_text(json.dumps(envelope))
    with pytest.raises(IntegrityError, match="does not verify"):
        reg.load_arrays(1)


def test_swapped_manifests_are_detected(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    reg = open_registry(tmp_path, key)
    register(reg, 1, 0.2)
    register(reg, 2, 0.3, parent=1)
    one = tmp_path / "versions" / "v000001.manifest.json"
    two = tmp_path / "versions" / "v000002.manifest.json"
    one_bytes = one.read_bytes()
    one.write_bytes(two.read_bytes())
    two.write_bytes(one_bytes)
    with pytest.raises(IntegrityError, match="another version"):
        reg.get(1)


def test_gate_rules() -> None:
    assert gate({"ndcg@10": 0.295}, {"ndcg@10": 0.30}).promote  # within tolerance
    decision = gate({"ndcg@10": 0.28}, {"ndcg@10": 0.30})
    assert not decision.promote and "worse by 0.02" in decision.reason
    assert gate({"ndcg@10": 0.1}, None).promote
    assert not gate({"loss": 0.1}, {"ndcg@10": 0.3}).promote
    assert not gate({"ndcg@10": float("nan")}, {"ndcg@10": 0.3}).promote
    assert gate(
        {"loss": 0.50}, {"loss": 0.45}, metric="loss", tolerance=0.05, higher_is_better=False
    ).promote
    assert not gate(
        {"loss": 0.51}, {"loss": 0.45}, metric="loss", tolerance=0.05, higher_is_better=False
    ).promote
    with pytest.raises(ConfigError, match=r"-0\.1"):
        gate({"ndcg@10": 0.3}, None, tolerance=-0.1)


def test_gate_candidate_promotes_or_keeps(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    reg = open_registry(tmp_path, key)
    assert reg.promoted() is None
    first = register(reg, 1, 0.30)
    assert reg.gate_candidate(first, now=NOW).promote
    worse = register(reg, 2, 0.25, parent=first)
    decision = reg.gate_candidate(worse, now=NOW)
    assert not decision.promote
    promoted = reg.promoted()
    assert promoted is not None and promoted.id == first
    assert reg.get(worse).id == worse  # kept in the registry
    better = register(reg, 3, 0.31, parent=first)
    assert reg.gate_candidate(better, now=NOW).promote
    history = reg.gate_history()
    assert [(c, cur, p) for c, cur, p, _ in history] == [
        (1, None, True),
        (2, 1, False),
        (3, 1, True),
    ]
    assert "kept, not promoted" in history[1][3]


def test_rollback_is_a_stack_and_survives_restart(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    reg = open_registry(tmp_path, key)
    for seed in (1, 2, 3, 4):
        register(reg, seed, 0.1 * seed)
    with pytest.raises(StateError, match="nothing to roll back"):
        reg.rollback(reason="empty", now=NOW)
    for version in (1, 2, 3):
        reg.promote(version, reason=f"manual {version}", now=NOW)
    assert reg.rollback(reason="bad ctr", now=NOW).id == 2
    reg = open_registry(tmp_path, key)  # restart in the middle
    promoted = reg.promoted()
    assert promoted is not None and promoted.id == 2
    reg.promote(4, reason="manual 4", now=NOW)
    assert reg.rollback(reason="again", now=NOW).id == 2
    assert reg.rollback(reason="and again", now=NOW).id == 1
    with pytest.raises(StateError, match="nothing to roll back"):
        reg.rollback(reason="no more", now=NOW)
    actions = [(p.version_id, p.action) for p in reg.history()]
    assert actions == [
        (1, PromotionAction.PROMOTE),
        (2, PromotionAction.PROMOTE),
        (3, PromotionAction.PROMOTE),
        (2, PromotionAction.ROLLBACK),
        (4, PromotionAction.PROMOTE),
        (2, PromotionAction.ROLLBACK),
        (1, PromotionAction.ROLLBACK),
    ]
    assert reg.history()[3].reason == "bad ctr"


def test_unknown_version_names_the_id(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    reg = open_registry(tmp_path, key)
    with pytest.raises(NotFoundError, match="42"):
        reg.get(42)
    with pytest.raises(ConfigError, match="reason"):
        reg.promote(1, reason=" ")


def test_cli_list_show_promote_rollback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.errors import ExitCode
    from common.keys import generate_keypair, load_signing_key, load_verify_key
    from simulations import cli
    from simulations.cli import main

    # Only this group: the other command modules import torch and Flower (seconds).
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("simulations.commands.model",))

    private, public = generate_keypair(tmp_path / "keys", name="platform")
    signing = load_signing_key(private)
    reg = ModelRegistry(tmp_path / "reg", signing_key=signing, verify_key=load_verify_key(public))
    register(reg, 1, 0.2)
    register(reg, 2, 0.3, parent=1)
    register(reg, 3, 0.1, parent=2)
    flags = ["--registry", str(tmp_path / "reg"), "--verify-key", str(public)]
    assert main(["model", "promote", "1", "--reason", "first", *flags]) == 0
    assert main(["model", "promote", "2", "--reason", "better", *flags]) == 0
    capsys.readouterr()
    assert main(["model", "list", "--json", *flags]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["promoted"]) for r in rows] == [(1, False), (2, True), (3, False)]
    assert not reg.gate_candidate(3, tolerance=0.05).promote  # 0.1 vs 0.3: kept
    assert main(["model", "show", "3", *flags]) == 0
    gate = json.loads(capsys.readouterr().out)["gate"]
    assert (
        gate == [{"compared_with": 2, "promoted": False, "reason": gate[0]["reason"]}]
        and "kept, not promoted" in gate[0]["reason"]
    )
    assert main(["model", "rollback", "--reason", "ctr dropped", *flags]) == 0
    assert "version 1" in capsys.readouterr().out
    assert main(["model", "show", "1", *flags]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["promoted"] and shown["privacy_epsilon"] == {"m1": 0.5, "m2": 1.25}
    assert main(["model", "history", *flags]) == 0
    assert "rollback v1  ctr dropped" in capsys.readouterr().out
    (tmp_path / "reg" / "versions" / "v000002.npz").write_bytes(b"garbage")
    assert main(["model", "show", "2", *flags]) == ExitCode.INTEGRITY
    assert "v000002.npz changed" in capsys.readouterr().err
    assert main(["model", "rollback", "--reason", "x", *flags]) == ExitCode.STATE


@pytest.fixture()
def cli_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[ModelRegistry, Path, Path]:
    """A registry with versions 1..3, 1 then 2 promoted, and the public key's path."""
    from common.keys import generate_keypair, load_signing_key, load_verify_key
    from simulations import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", ("simulations.commands.model",))
    private, public = generate_keypair(tmp_path / "keys", name="platform")
    root = tmp_path / "reg"
    reg = ModelRegistry(
        root, signing_key=load_signing_key(private), verify_key=load_verify_key(public)
    )
    for seed in (1, 2, 3):
        register(reg, seed, 0.1 * seed, parent=seed - 1 or None)
    reg.promote(1, reason="first", now=NOW)
    reg.promote(2, reason="second", now=NOW)
    return reg, root, public


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(path: Path) -> None:
    envelope = json.loads(path.read_text())
    envelope["manifest"]["privacy"]["m2"] = 0.01
    path.write_text(json.dumps(envelope))


@pytest.mark.parametrize("damage", ["weights byte", "manifest", "wrong key"])
def test_rollback_verifies_the_target_before_recording(
    cli_registry: tuple[ModelRegistry, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: str,
) -> None:
    from common.errors import ExitCode
    from common.keys import generate_keypair
    from simulations.cli import main

    reg, root, public = cli_registry
    reg.promote(3, reason="third", now=NOW)  # rolling back would serve 2 again
    key_file = public
    if damage == "weights byte":
        _flip_byte(root / "versions" / "v000002.npz")
        named = "v000002.npz"
    elif damage == "manifest":
        _edit_manifest(root / "versions" / "v000002.manifest.json")
        named = "v000002.manifest.json"
    else:
        key_file = generate_keypair(tmp_path / "other", name="other")[1]
        named = "v000002.manifest.json"
    before = reg.history()
    flags = ["--registry", str(root), "--verify-key", str(key_file)]
    code = main(["model", "rollback", "--reason", "oops", *flags])
    assert code == ExitCode.INTEGRITY
    assert named in capsys.readouterr().err
    assert reg.history() == before  # nothing recorded
    if damage == "wrong key":  # the registry itself is intact and still serves 3
        assert main(["model", "list", "--registry", str(root), "--verify-key", str(public)]) == 0
        assert "   3*" in capsys.readouterr().out
    else:
        with pytest.raises(IntegrityError, match=named.replace(".", r"\.")):
            reg.rollback(reason="oops", now=NOW)
        assert reg.history() == before
        promoted = reg.promoted()
        assert promoted is not None and promoted.id == 3


def test_model_commands_never_create_a_registry(
    cli_registry: tuple[ModelRegistry, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from common.errors import ExitCode
    from simulations.cli import main

    _, root, public = cli_registry

    def run(action: list[str], registry: Path) -> tuple[int, str]:
        code = main(["model", *action, "--registry", str(registry), "--verify-key", str(public)])
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        return code, err

    readers = [["list"], ["show", "1"], ["history"]]
    writers = [["promote", "1", "--reason", "r"], ["rollback", "--reason", "r"]]
    missing = tmp_path / "typo" / "registry"
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "events.csv"
    a_file.write_text("customer_id\n")
    for action in readers + writers:
        code, err = run(action, missing)
        assert code == ExitCode.CONFIG and str(missing) in err and "does not exist" in err
        code, err = run(action, empty)
        assert code == ExitCode.CONFIG and "registry.sqlite" in err
        code, err = run(action, a_file)
        assert code == ExitCode.CONFIG and "not a directory" in err
    assert not (tmp_path / "typo").exists() and list(empty.iterdir()) == []

    index = root / "registry.sqlite"
    saved = index.read_bytes()
    index.write_bytes(saved[:4096])  # truncated: its first page only
    for action in readers:
        code, err = run(action, root)
        assert code == ExitCode.INTEGRITY and str(index) in err
    index.write_bytes(b"not a database at all, just some junk bytes " * 100)
    for action in readers + writers:
        code, err = run(action, root)
        assert code == ExitCode.INTEGRITY and str(index) in err

    index.unlink()  # deleted: the promotion history is gone and must not be recreated empty
    for action in readers + writers:
        code, err = run(action, root)
        assert code == ExitCode.INTEGRITY and str(index) in err and "v000001" in err
    assert not index.exists()
    key = Ed25519PrivateKey.generate()
    with pytest.raises(IntegrityError, match="promotion history"):
        ModelRegistry(root, signing_key=key, verify_key=key.public_key())
    assert not index.exists()
    index.write_bytes(b"")  # an empty index is no better than a missing one
    with pytest.raises(IntegrityError, match="promotion history"):
        ModelRegistry(root, signing_key=key, verify_key=key.public_key())

    index.write_bytes(saved)  # restored from a backup: everything is back
    assert main(["model", "history", "--registry", str(root), "--verify-key", str(public)]) == 0
    assert "second" in capsys.readouterr().out
