"""No code runs from configuration text or pickles (an AST scan and the real loaders); indexes survive crashes."""

from __future__ import annotations

import ast
import os
import pickle
import re
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import compose_config, demo_overrides

ROOT = Path(__file__).resolve().parents[1]

# --- No eval/exec of configuration text, no unpickling -------------------------------------------------------------

SKIPPED_FOLDERS = {"tests", "outputs", "multirun", "wandb", "demo_assets", "__pycache__", "node_modules"}
#: (path, call) pairs reviewed and allowed, with the reason.
ALLOWED = {
    # `optimizer.type` selects an entry of the fixed OPTIMIZERS table; config text never reaches import_module.
    ("solver/build.py", "importlib.import_module"),
}
ALWAYS_UNSAFE = {
    "eval": "eval() of text",
    "exec": "exec() of text",
    "compile": "compile() of text",
    "__import__": "import by name from text",
    "importlib.import_module": "import by name from text",
    "pickle.load": "unpickling runs code",
    "pickle.loads": "unpickling runs code",
    "pickle.Unpickler": "unpickling runs code",
    "dill.load": "unpickling runs code",
    "dill.loads": "unpickling runs code",
    "cloudpickle.load": "unpickling runs code",
    "cloudpickle.loads": "unpickling runs code",
    "joblib.load": "unpickling runs code",
    "marshal.load": "unmarshalling code objects",
    "marshal.loads": "unmarshalling code objects",
    "shelve.open": "shelve unpickles",
    "pandas.read_pickle": "unpickling runs code",
    "torch.hub.load": "runs a repository's hubconf.py",
    "yaml.unsafe_load": "YAML tags construct arbitrary objects",
    "yaml.full_load": "YAML tags construct arbitrary objects",
    "yaml.load_all": "YAML tags construct arbitrary objects",
    "hydra.utils.instantiate": "imports and calls any class a config names",
    "hydra.utils.call": "imports and calls any function a config names",
    "hydra.utils.get_class": "imports any class a config names",
    "hydra.utils.get_method": "imports any function a config names",
    "hydra.utils.get_object": "imports any object a config names",
}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (base := _dotted(node.value)):
        return f"{base}.{node.attr}"
    return None


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_constant(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_calls(source: str) -> list[tuple[int, str, str]]:
    """(line, call, reason) for every call in `source` that evaluates text or unpickles, imports resolved."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname})
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not (name := _dotted(node.func)):
            continue
        head, _, rest = name.partition(".")
        call = f"{aliases.get(head, head)}{'.' if rest else ''}{rest}".replace("builtins.", "")
        reason = ALWAYS_UNSAFE.get(call)
        if call == "torch.load" and not _is_constant(_keyword(node, "weights_only"), True):
            reason = "torch.load without weights_only=True unpickles"
        elif call == "yaml.load":
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if not (loader is not None and (_dotted(loader) or "").split(".")[-1] in SAFE_YAML_LOADERS):
                reason = "yaml.load without a safe Loader"
        elif call == "numpy.load" and _is_constant(_keyword(node, "allow_pickle"), True):
            reason = "numpy.load(allow_pickle=True) unpickles"
        if _is_constant(_keyword(node, "weights_only"), False):
            reason = "weights_only=False unpickles"
        if _is_constant(_keyword(node, "trust_remote_code"), True):
            reason = "trust_remote_code=True runs a checkpoint's Python code"
        if reason:
            found.append((node.lineno, call, reason))
    return found


def _project_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return sorted(files)


def test_the_checker_finds_every_unsafe_call_and_accepts_the_safe_ones():
    unsafe = textwrap.dedent(
        """
        import pickle as pk, yaml, torch, numpy as np
        from hydra.utils import instantiate
        from torch import load
        eval(cfg.expr); exec(text); pk.loads(data); torch.load(path); load(path, weights_only=False)
        yaml.load(text); yaml.load(text, Loader=yaml.FullLoader); np.load(path, allow_pickle=True); instantiate(cfg)
        AutoModel.from_pretrained(path, trust_remote_code=True); Module.load_from_checkpoint(path, weights_only=False)
        """
    )
    assert len(unsafe_calls(unsafe)) == 11, unsafe_calls(unsafe)
    safe = textwrap.dedent(
        """
        import ast, yaml, torch, numpy as np
        model.eval(); ast.literal_eval(text); torch.load(path, weights_only=True); yaml.safe_load(text)
        yaml.load(text, Loader=yaml.SafeLoader); np.load(path); Module.load_from_checkpoint(path, weights_only=True)
        """
    )
    assert unsafe_calls(safe) == []


def test_no_project_code_evaluates_text_or_unpickles():
    files = _project_files()
    names = {path.relative_to(ROOT).as_posix() for path in files}
    assert {"trainer.py", "lightning_models.py", "model/strategies.py", "search_app/index.py"} <= names
    problems = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        for line, call, reason in unsafe_calls(path.read_text(encoding="utf-8")):
            if (relative, call) not in ALLOWED:
                problems.append(f"{relative}:{line}: {call}: {reason}")
    assert not problems, "\n".join(problems)


def _yaml_keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(map(str, node)) | {key for value in node.values() for key in _yaml_keys(value)}
    if isinstance(node, list):
        return {key for value in node for key in _yaml_keys(value)}
    return set()


def test_configs_name_no_classes_to_instantiate():
    """`_target_` in a config would let config text import and call any class (hydra.utils.instantiate)."""
    configs = sorted((ROOT / "config").rglob("*.yaml"))
    assert len(configs) > 20
    # Hydra's own plugin settings (launchers, the Optuna sampler) name the plugin classes Hydra instantiates itself;
    # they sit under the `hydra` key or in config/hydra/, never in the training config a checkpoint stores.
    configs = [path for path in configs if "hydra" not in path.relative_to(ROOT / "config").parts[:1]]
    for path in configs:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        keys = _yaml_keys({key: value for key, value in (loaded or {}).items() if key != "hydra"})
        assert not keys & {"_target_", "_partial_", "_call_", "_args_"}, path


class _RunsOnUnpickle:
    """Unpickling this creates `marker`: a stand-in for a checkpoint that runs code when loaded unsafely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _payload_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": _RunsOnUnpickle(marker)}}, path)
    return path


def test_checkpoint_loaders_refuse_pickled_code(tmp_path):
    import lightning as L

    from lightning_models import TBPSLitModule
    from search_app.encoder import ModelSourceError, load_encoder

    control = tmp_path / "control"
    torch.load(_payload_checkpoint(tmp_path / "control.ckpt", control), weights_only=False)
    assert control.exists(), "the payload must run when unpickled, or this test proves nothing"

    marker = tmp_path / "ran"
    checkpoint = _payload_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(pickle.UnpicklingError):  # trainer.py evaluate() and prepare_checkpoints.py: the default
        TBPSLitModule.load_from_checkpoint(checkpoint, map_location="cpu")
    with pytest.raises(pickle.UnpicklingError):  # trainer.fit(ckpt_path=...) resumes through the strategy
        L.Trainer(accelerator="cpu", logger=False).strategy.load_checkpoint(checkpoint)
    with pytest.raises(ModelSourceError, match="pickled code"):
        load_encoder(checkpoint, device=torch.device("cpu"))
    assert not marker.exists()


def test_training_checkpoints_load_as_plain_tensors(demo_root, tmp_path):
    from lightning_models import TBPSLitModule
    from trainer import train

    overrides = demo_overrides(
        demo_root, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "dataset.test_batch_size=512"
    )
    train(compose_config("demo", overrides), tmp_path)
    checkpoints = sorted((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(checkpoints) == 2  # the best and last.ckpt
    for path in checkpoints:
        state = torch.load(path, weights_only=True, map_location="cpu")
        assert {"state_dict", "hyper_parameters", "rng_states", "optimizer_states"} <= set(state)
        TBPSLitModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def test_search_index_is_safetensors_and_json_and_loads_without_unpickling(tmp_path, monkeypatch):
    from search_app.manifest import SearchIndex, commit_index

    embeddings = torch.randn(3, 4)
    commit_index(tmp_path / "index", _index_manifest(tmp_path, 3), embeddings)
    names = sorted(p.name for p in (tmp_path / "index").iterdir())
    assert len(names) == 2 and names[0].endswith(".safetensors") and names[1] == "manifest.json", names

    def refuse(*args, **kwargs):
        raise AssertionError("the index must not be unpickled")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, refuse)
    assert torch.equal(SearchIndex.load(tmp_path / "index").embeddings, embeddings)


@pytest.mark.parametrize("damage", ["manifest", "embeddings"])
def test_damaged_index_is_a_clear_error(tmp_path, damage):
    from search_app.manifest import SearchIndex, SearchIndexError, commit_index

    index_dir = tmp_path / "index"
    commit_index(index_dir, _index_manifest(tmp_path, 3), torch.randn(3, 4))
    target = index_dir / "manifest.json" if damage == "manifest" else next(index_dir.glob("*.safetensors"))
    target.write_bytes(target.read_bytes()[:20])  # truncated, as an index copied by a crashed tool would be
    with pytest.raises(SearchIndexError, match=f"{re.escape(str(index_dir))}.*index again"):
        SearchIndex.load(index_dir)


# --- Search indexes -----------------------------------------------------------------------------------------


def _index_manifest(root: Path, count: int) -> dict:
    files = [{"path": f"{i}.jpg", "size": 1, "mtime_ns": 0} for i in range(count)]
    return {"embed_dim": 4, "image_root": str(root), "files": files, "model": {"files": []}}


def test_interrupted_index_update_keeps_the_previous_index(tmp_path, monkeypatch):
    from search_app.manifest import SearchIndex, commit_index

    index_dir = tmp_path / "index"
    commit_index(index_dir, _index_manifest(tmp_path, 2), torch.ones(2, 4))
    real_replace = os.replace

    def crash_on_manifest(source, target):
        if Path(target).name == "manifest.json":
            raise OSError("disk full")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="disk full"):
        commit_index(index_dir, _index_manifest(tmp_path, 3), torch.zeros(3, 4))
    monkeypatch.undo()
    index = SearchIndex.load(index_dir)
    assert len(index.entries) == 2 and torch.equal(index.embeddings, torch.ones(2, 4))
    assert not list(index_dir.glob("*.tmp"))
