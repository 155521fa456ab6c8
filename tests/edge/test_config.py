"""The device config: every bad field is one line naming the file and the field, secrets never
print, and docs/config.md is the model's own reference."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from edge import config as cfgmod
from edge.cli import main
from edge.config import Config, ConfigError, config_reference_markdown, load_config
from edge.manifest import CascadeSettings

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "systemd" / "config.example.yaml"
MINIMAL = "device: {id: trap-07}\nwatch: {folders: [incoming]}\n"


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _errors(tmp_path: Path, text: str) -> list[str]:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == "\n".join(e.value.lines)
    return e.value.lines


def test_example_config_is_valid():
    cfg = load_config(EXAMPLE)
    assert cfg.device.id == "trap-01"
    assert cfg.engine.type == "tensorrt"
    assert cfg.mqtt is not None and cfg.mqtt.port == 8883
    assert cfg.watch.folders == [Path("/srv/camtrap/incoming")]


def test_minimal_config_derives_paths_from_state_dir(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL + "paths: {state_dir: state}\n"))
    state = tmp_path / "state"  # relative paths are relative to the config file's folder
    assert cfg.paths.state_dir == state
    assert cfg.watch.folders == [tmp_path / "incoming"]
    assert cfg.ledger.path == state / "ledger.sqlite3"
    assert cfg.bundle.path == state / "models" / "current"
    assert cfg.engine.cache_dir == state / "engines"
    assert cfg.records.md_json == state / "records" / "md_results.json"
    assert cfg.records.camtrapdp_dir == state / "records" / "camtrapdp"
    assert cfg.disposal.audit_dir == state / "audit"
    assert cfg.device.deployment_id == "trap-07"
    assert cfg.mqtt is None
    assert (cfg.disposal.policy, cfg.disposal.audit_rate) == ("keep", 0.01)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("mqtt: {port: 70000}", "mqtt.port: Input should be less than or equal to 65535"),
        ("engine: {type: tensorflow}", "engine: Input tag 'tensorflow' found using 'type' does not match any of "
         "the expected tags: 'onnxruntime', 'tensorrt'"),
        ("engine: {type: tensorrt, precision: fp8}", "engine.precision: Input should be 'fp32', 'fp16' or 'int8'"),
        ("engine: {precision: fp16}", "engine.precision: unknown key (allowed: type, max_batch, cache_dir, "
         "warmup_runs, providers, intra_op_threads, allow_spinning, fp16)"),
        ("engine: {providers: [CUDA]}", "engine.providers[0]: Input should be 'auto', 'cpu', 'cuda' or 'tensorrt'"),
        ("engine: {type: tensorrt, max_batch: 65}", "engine.max_batch: Input should be less than or equal to 64"),
        ("disposal: {audit_rate: 1.5}", "disposal.audit_rate: Input should be less than or equal to 1"),
        ("disposal: {policy: move}", "disposal.move_to: must be set when policy is move"),
        ("disposal: {policy: move, move_to: incoming/empties}",
         "disposal.move_to: {dir}/incoming/empties is inside watched folder {dir}/incoming"),
        ("cascade: {gate_threshold: 0.1, disable_gate: true}", "cascade.gate_threshold: set gate_threshold or"),
        ("bundle: {public_keys_dir: null}", "bundle.public_keys_dir: must be set when require_signature is true"),
        ("events: {gap_s: 0}", "events.gap_s: Input should be greater than 0"),
        ("telemetry: {every_s: 1}", "telemetry.every_s: Input should be greater than or equal to 5"),
        ("engine: {batch: 4}", "engine.batch: unknown key (allowed: type, max_batch, cache_dir, warmup_runs,"),
        ("colour: blue", "colour: unknown key (allowed: device, watch, bundle,"),
        ("records: {project: {contributors: [{title: x, role: boss}]}}",
         "records.project.contributors[0].role: Input should be 'contact'"),
        ("mqtt: {host: b, prefix: x}", "mqtt.prefix: must end with '/'"),
    ],
)
def test_one_clear_line_per_bad_field(tmp_path, extra, expected):
    lines = _errors(tmp_path, MINIMAL + extra + "\n")
    p = tmp_path / "config.yaml"
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{p}: "), lines
    assert expected.format(dir=tmp_path) in lines[0], lines


def test_every_bad_field_is_reported_at_once(tmp_path):
    lines = _errors(tmp_path, """\
        device: {id: "trap/07", timezone: Mars/Olympus, latitude: 91}
        watch: {folders: [], polling: maybe}
        mqtt: {port: 0}
        engine: {type: tensorrt, max_batch: 0}
        """)
    fields = [line.split(": ")[1] for line in lines]
    assert fields == ["device.id", "device.latitude", "device.timezone", "watch.folders", "watch.polling",
                      "engine.max_batch", "mqtt.port"]  # fmt: skip


def test_missing_required_sections(tmp_path):
    lines = _errors(tmp_path, "engine: {type: onnxruntime}\n")
    assert [line.split(": ", 1)[1] for line in lines] == ["device: Field required", "watch: Field required"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty config"),
        ("- a\n- b\n", "top level must be a mapping, got list"),
        ("device: {id: x\nwatch: [\n", "line 2: not valid YAML"),
    ],
)
def test_unusable_files(tmp_path, text, expected):
    lines = _errors(tmp_path, text)
    assert len(lines) == 1 and expected in lines[0] and str(tmp_path / "config.yaml") in lines[0]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAP_ID", "trap-42")
    monkeypatch.setenv("MQTT_PW", "s3cret-value")
    monkeypatch.delenv("UNSET_THING", raising=False)
    cfg = load_config(_write(tmp_path, """\
        device: {id: "${TRAP_ID}", location_name: "cost $$5 ${UNSET_THING:-nowhere}"}
        watch: {folders: [incoming]}
        mqtt: {host: "${BROKER:-localhost}", username: u, password: "${MQTT_PW}"}
        """))
    assert cfg.device.id == "trap-42"
    assert cfg.device.location_name == "cost $5 nowhere"
    assert cfg.mqtt.password.get_secret_value() == "s3cret-value"
    assert "s3cret-value" not in repr(cfg) and "s3cret-value" not in str(cfg.model_dump())
    lines = _errors(tmp_path, MINIMAL + "mqtt: {username: u, password: '${UNSET_THING}'}\n")
    assert lines == [f"{tmp_path / 'config.yaml'}: mqtt.password: environment variable UNSET_THING is not set"]


def test_secret_never_printed_even_when_misplaced(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MQTT_PW", "s3cret-value")
    p = _write(tmp_path, MINIMAL + "mqtt: {port: '${MQTT_PW}', username: u, password: '${MQTT_PW}'}\n")
    assert main(["check-config", str(p)]) == 2
    out = capsys.readouterr()
    assert "mqtt.port" in out.out
    assert "s3cret-value" not in out.out + out.err


def test_check_config_ok_prints_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MQTT_PW", "s3cret-value")
    (tmp_path / "incoming").mkdir()
    p = _write(tmp_path, MINIMAL + "mqtt: {host: broker.lan, username: trap, password_env: MQTT_PW}\n"
                                   "bundle: {require_signature: false}\n")  # fmt: skip
    assert main(["check-config", str(p)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {p}\n")
    assert "device: trap-07" in out
    assert "mqtt: broker.lan:1883 MQTT 5 as trap (password from $MQTT_PW), topics camtrap/trap-07/" in out
    assert "s3cret-value" not in out
    assert "warning: bundle" in out  # valid, but the bundle is not there yet


def test_check_config_errors_exit_2_one_per_line(tmp_path, capsys):
    p = _write(tmp_path, MINIMAL + "mqtt: {port: 70000}\nengine: {type: x}\n")
    assert main(["check-config", str(p)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith(f"{p}: ") for line in out)


def test_check_config_runtime_problem_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NOPE_PW", raising=False)
    p = _write(tmp_path, MINIMAL + "mqtt: {username: u, password_env: NOPE_PW}\n")
    assert main(["check-config", str(p)]) == 2
    assert "mqtt.password_env: environment variable NOPE_PW is not set" in capsys.readouterr().out


def _models(model: type[BaseModel], seen: set) -> list[type[BaseModel]]:
    out = [model]
    seen.add(model)
    for f in model.model_fields.values():
        sub = cfgmod._model_of(f.annotation)
        if sub is not None and sub not in seen:
            out += _models(sub, seen)
    return out


def test_every_field_of_our_sections_has_title_and_description():
    engines = list(cfgmod._tagged_models(Config.model_fields["engine"].annotation).values())
    ours = [m for m in _models(Config, set()) if m.__module__ == "edge.config"] + engines
    assert len(ours) >= 16 and {e.__name__ for e in engines} == {"OnnxRuntimeConfig", "TensorRTConfig"}
    missing = [f"{m.__name__}.{n}" for m in ours for n, f in m.model_fields.items()
               if not f.title or not f.description]  # fmt: skip
    assert missing == []


def test_docs_config_md_is_up_to_date():
    doc = (REPO / "docs" / "config.md").read_text()
    assert doc == config_reference_markdown(), "regenerate: python -m edge.config > docs/config.md"
    for key in ("## `device`", "## `mqtt`", "## `records.project`", "`audit_rate`", "`require_signature`"):
        assert key in doc


# --- the cascade section is derived from the manifest's CascadeSettings -----------------------------
@pytest.mark.parametrize("name", list(CascadeSettings.model_fields))
def test_every_cascade_setting_is_overridable_from_the_config(tmp_path, name):
    field = CascadeSettings.model_fields[name]
    value = (not field.default) if field.annotation is bool else 2 if field.annotation in (int, int | None) else 0.42
    cfg = load_config(_write(tmp_path, MINIMAL + f"cascade: {{{name}: {str(value).lower()}}}\n"))
    bundle = CascadeSettings(gate_threshold=0.05)
    policy = cfg.cascade.apply(bundle)
    assert getattr(policy, name) == value
    unchanged = {k: v for k, v in bundle.model_dump().items() if k != name}
    assert {k: getattr(policy, k) for k in unchanged} == unchanged  # unset = the bundle's value


@pytest.mark.parametrize(("name", "bad"), [("route_threshold", "1.5"), ("expert_floor", "-0.1"),
                                           ("gate_threshold", "1.5"), ("merge_iou", "0"),
                                           ("keep_unmatched_global", "maybe")])
def test_bad_cascade_value_is_one_line_naming_the_field(tmp_path, name, bad):
    lines = _errors(tmp_path, MINIMAL + f"cascade: {{{name}: {bad}}}\n")
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'config.yaml'}: cascade.{name}: "), lines
    with pytest.raises(ValidationError):  # the manifest refuses the same value: one set of bounds
        CascadeSettings.model_validate({name: yaml.safe_load(bad)})


@pytest.mark.parametrize("name", [n for n, f in CascadeSettings.model_fields.items()
                                  if f.default is None])  # the settings that have an off state
def test_null_in_the_config_turns_off_a_setting_the_bundle_turns_on(tmp_path, name):
    """An explicit null sets the setting back to off over a bundle that sets it (background_stop
    could not be unset: null read as 'keep the bundle's'); a key left out keeps the bundle's."""
    on = {"gate_threshold": 0.05, "background_stop": 0.5, "background_max_experts": 1, "route_reuse": 0.6}[name]
    bundle = CascadeSettings(**{name: on})
    assert getattr(load_config(_write(tmp_path, MINIMAL + f"cascade: {{{name}: null}}\n")).cascade.apply(bundle),
                   name) is None
    assert getattr(load_config(_write(tmp_path, MINIMAL + "cascade: {}\n")).cascade.apply(bundle), name) == on
    # a setting with no off state keeps the bundle's value on null
    kept = load_config(_write(tmp_path, MINIMAL + "cascade: {route_threshold: null}\n")).cascade.apply(bundle)
    assert kept.route_threshold == bundle.route_threshold


def test_disable_gate_overrides_the_bundle_gate(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL + "cascade: {disable_gate: true}\n"))
    assert cfg.cascade.apply(CascadeSettings(gate_threshold=0.05)).gate_threshold is None
    assert load_config(_write(tmp_path, MINIMAL)).cascade.apply(CascadeSettings(gate_threshold=0.05)
                                                                ).gate_threshold == 0.05


# --- check-config --strict: what would stop the daemon on this machine ----------------------------
def test_check_config_strict_fails_on_missing_watch_folder_and_bundle(tmp_path, capsys):
    p = _write(tmp_path, MINIMAL + "bundle: {require_signature: false, path: nowhere}\n")
    assert main(["check-config", str(p)]) == 0  # plain: warnings only
    capsys.readouterr()
    assert main(["check-config", "--strict", str(p)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{p}: watch folder {tmp_path / 'incoming'} does not exist (yet) or is not a folder",
                   f"{p}: bundle {tmp_path / 'nowhere'} does not exist (yet)"]
    (tmp_path / "incoming").mkdir()
    (tmp_path / "nowhere").mkdir()
    assert main(["check-config", "--strict", str(p)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {p}\n")


def test_check_config_strict_fails_on_an_engine_runtime_that_is_not_installed(tmp_path, capsys):
    (tmp_path / "incoming").mkdir()
    (tmp_path / "b").mkdir()
    p = _write(tmp_path, MINIMAL + "bundle: {require_signature: false, path: b}\nengine: {type: tensorrt}\n")
    assert main(["check-config", "--strict", str(p)]) == 2  # no tensorrt/pycuda on this machine
    assert capsys.readouterr().out == f"{p}: engine: the tensorrt backend needs tensorrt, pycuda, not importable here\n"


def test_an_override_that_breaks_a_rule_between_fields_fails_in_one_line(tmp_path):
    """background_stop must be at least expert_floor: only checkable against the bundle's values."""
    cfg = load_config(_write(tmp_path, MINIMAL + "cascade: {background_stop: 0.2}\n"))
    assert cfg.cascade.apply(CascadeSettings(expert_floor=0.1)).background_stop == 0.2
    with pytest.raises(ValueError) as e:
        cfg.cascade.apply(CascadeSettings(expert_floor=0.3))
    assert not isinstance(e.value, ValidationError)
    assert str(e.value) == ("cascade: background_stop 0.2 is below expert_floor 0.3: the pass would stop on an "
                            "answer it then drops (the config's overrides on the bundle's cascade settings)")


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """YAML itself lets the later key win in silence: a second mqtt: block pasted at the end of a
    config would replace the first one unseen."""
    lines = _errors(tmp_path, MINIMAL + "mqtt: {host: a}\nalerts: {species: [lynx]}\nmqtt: {host: b}\n")
    assert lines == [f"{tmp_path / 'config.yaml'}: line 5: not valid YAML: key 'mqtt' given twice "
                     "(first on line 3): the later one would silently win"]
    nested = _errors(tmp_path, "device: {id: a, id: b}\nwatch: {folders: [x]}\n")
    assert "line 1: not valid YAML: key 'id' given twice" in nested[0]


def test_yaml_aliases_are_refused_at_once(tmp_path):
    """A dozen lines of anchors and aliases expand to billions of values (check-config hung)."""
    bomb = "".join(f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n"
                   for a, b in zip("abcdefghi", "bcdefghij", strict=True))
    p = _write(tmp_path, MINIMAL + "a: &a [x, x, x, x, x, x, x, x, x]\n" + bomb)
    import time

    t0 = time.monotonic()
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert time.monotonic() - t0 < 5
    assert e.value.lines == [f"{p}: line 4: not valid YAML: alias *a refused (anchors and aliases are not "
                             "allowed in the config)"]


# --- true/false is not a number (edge.numbers) ------------------------------------------------------
def _numeric(annotation) -> bool:
    import typing

    return annotation in (int, float) or any(_numeric(a) for a in typing.get_args(annotation))


def _number_fields() -> list[tuple[type[BaseModel], str]]:
    """Every field of the config's sections, the engines' configs and the manifest's entries whose
    type is a number and not a boolean."""
    from edge import manifest
    from edge.numbers import takes_bool

    engines = list(cfgmod._tagged_models(Config.model_fields["engine"].annotation).values())
    ours = {m for m in _models(Config, set()) if m.__module__.startswith("edge.")} | set(engines)
    ours |= {m for m in vars(manifest).values() if isinstance(m, type) and issubclass(m, BaseModel)
             and m.__module__ == "edge.manifest"}
    return sorted(((m, n) for m in ours for n, f in m.model_fields.items()
                   if _numeric(f.annotation) and not takes_bool(f.annotation)),
                  key=lambda mn: (mn[0].__name__, mn[1]))


def test_a_boolean_given_for_a_number_is_refused_naming_the_field():
    """pydantic reads true as 1: `route_reuse: yes` meant "on" and was a threshold of 1.0 (never
    reused), `background_max_experts: true` one expert, a manifest's `imgsz: true` a 1 px input."""
    fields = _number_fields()
    names = {n for _, n in fields}
    assert {"route_reuse", "background_max_experts", "imgsz", "intra_op_threads", "gap_s"} <= names
    taken = []
    for model, name in fields:
        try:
            model.model_validate({name: True})
            taken.append(f"{model.__name__}.{name}")
        except ValidationError as e:
            if not any(err["loc"][:1] == (name,) for err in e.errors()):
                taken.append(f"{model.__name__}.{name}")
    assert taken == []


@pytest.mark.parametrize("text", ["cascade: {route_reuse: yes}", "cascade: {background_max_experts: true}",
                                  "engine: {intra_op_threads: true}"])
def test_a_boolean_for_a_number_in_the_config_is_one_line(tmp_path, text):
    lines = _errors(tmp_path, MINIMAL + text + "\n")
    section, key = text.split(":")[0], text.split("{")[1].split(":")[0]
    assert len(lines) == 1 and f"{section}.{key}: Input should be a valid" in lines[0], lines
