"""Case files: expansion to stable IDs, and errors that name the file and the field."""

import textwrap

import pytest

from harness.matrix.cases import CaseFileError, UnknownCaseError, load_cases, matches

pytestmark = pytest.mark.cpu


def write(tmp_path, text, name="c.yaml"):
    (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def test_repository_cases_load_and_have_unique_stable_ids(case_set):
    ids = case_set.ids()
    assert len(ids) == len(set(ids))
    assert "llama/tp1/memory/roundtrip" in ids
    for case_id in ids:
        assert case_id.count("/") == 3, case_id


def test_expansion_is_the_cartesian_product(tmp_path):
    d = write(tmp_path, """
        matrix:
          - families: [llama]
            layouts: [tp1, tp2]
            paths: [memory/roundtrip]
    """)
    assert load_cases(d).ids() == ["llama/tp1/memory/roundtrip", "llama/tp2/memory/roundtrip"]


def test_ids_do_not_depend_on_spelling_of_layouts(tmp_path):
    d = write(tmp_path, """
        matrix:
          - families: [llama]
            layouts: [pp2-tp2]
            paths: [memory/roundtrip]
    """)
    assert load_cases(d).ids() == ["llama/tp2-pp2/memory/roundtrip"]


@pytest.mark.parametrize(
    "body,field,words",
    [
        ("families: [lama]\n    layouts: [tp1]\n    paths: [memory/roundtrip]", "matrix[0].families", "unknown family 'lama'"),
        ("families: [llama]\n    layouts: [tp1]\n    paths: [memory/rountrip]", "matrix[0].paths", "unknown path"),
        ("families: [llama]\n    layouts: [tq1]\n    paths: [memory/roundtrip]", "matrix[0].layouts", "bad layout"),
        ("families: [llama]\n    layouts: [tp1]\n    paths: [memory/roundtrip]\n    colour: red", "matrix[0].colour", "unknown field"),
        ("families: [llama]\n    paths: [memory/roundtrip]", "matrix[0].layouts", "required"),
        ("families: [llama]\n    layouts: [tp1]\n    paths: [memory/roundtrip]\n    sets: [weekly]", "matrix[0].sets", "unknown set"),
        ("families: [llama]\n    layouts: [tp1]\n    paths: [memory/roundtrip]\n    timeout_s: -1", "matrix[0].timeout_s", "positive"),
    ],
)
def test_bad_field_errors_name_file_and_field(tmp_path, body, field, words):
    d = write(tmp_path, "matrix:\n  - " + body + "\n", name="broken.yaml")
    with pytest.raises(CaseFileError) as err:
        load_cases(d)
    message = str(err.value)
    assert "broken.yaml" in message and field in message and words in message


def test_unknown_top_level_field(tmp_path):
    d = write(tmp_path, "matrix: []\nmatirx: []\n", name="top.yaml")
    with pytest.raises(CaseFileError, match="top.yaml: matirx: unknown field"):
        load_cases(d)


def test_duplicate_ids_across_files_are_refused(tmp_path):
    body = "matrix:\n  - families: [llama]\n    layouts: [tp1]\n    paths: [memory/roundtrip]\n"
    write(tmp_path, body, "a.yaml")
    write(tmp_path, body, "b.yaml")
    with pytest.raises(CaseFileError, match="also declared in"):
        load_cases(tmp_path)


def test_unknown_case_id_names_the_closest(case_set):
    with pytest.raises(UnknownCaseError) as err:
        case_set.get("llama/tp1/memory/roundtrp")
    assert "llama/tp1/memory/roundtrip" in str(err.value)


@pytest.mark.parametrize(
    "expr,hit",
    [("llama", True), ("qwen", False), ("llama/*/memory/*", True), ("not llama", False), ("qwen or tp1", True), ("llama and tp2", False)],
)
def test_k_expressions(expr, hit):
    assert matches("llama/tp1/memory/roundtrip", expr) is hit


@pytest.mark.parametrize(
    "family,layout,rule",
    [
        ("llama", "tp8", "attention heads 4 not divisible by tp8"),
        ("llama", "tp1-pp4", "layers 2 not divisible by pp4"),
        ("qwen2", "tp4", "vocab 250 not divisible by tp4"),
        ("llama", "tp1-ep2", "has no experts"),
        ("qwen3-moe", "tp1-ep8", "experts 4 not divisible by ep8"),
    ],
)
def test_invalid_layouts_are_refused_up_front_naming_the_rule(tmp_path, family, layout, rule):
    d = write(tmp_path, f"matrix:\n  - families: [{family}]\n    layouts: [{layout}]\n    paths: [memory/roundtrip]\n")
    with pytest.raises(CaseFileError) as err:
        load_cases(d)
    assert "matrix[0].layouts" in str(err.value) and rule in str(err.value)


def test_padded_vocab_lifts_the_vocab_rule(tmp_path):
    d = write(tmp_path, "matrix:\n  - families: [llama@padded]\n    layouts: [tp4]\n    paths: [memory/roundtrip]\n")
    assert load_cases(d).ids() == ["llama@padded/tp4/memory/roundtrip"]


def test_every_family_has_cases_and_cpu_blocked_ones_say_why(case_set):
    from harness.matrix import family_registry
    from harness.matrix import lanes

    families = {c.model.family for c in case_set.cases}
    assert families == set(family_registry.families()), "a family without cases was silently dropped"
    for case in case_set.cases:
        if "cpu" not in case.lanes:
            assert lanes.case_blocker(case, "cpu") and lanes.note(case, "cpu").startswith(("GPU only: ", "no lane: "))


VARIANT_ENTRY = """matrix:
  - families: [llama]
    variants:
{variants}
    layouts: [tp1]
    paths: [memory/roundtrip]
"""


def test_case_file_variants_become_stable_readable_ids(tmp_path):
    d = write(tmp_path, VARIANT_ENTRY.format(variants="      mqa: {num_key_value_heads: 1}\n      sq: {intermediate_size: 64}"))
    cases = load_cases(d)
    assert cases.ids() == ["llama@mqa/tp1/memory/roundtrip", "llama@sq/tp1/memory/roundtrip"]
    mqa = cases.get("llama@mqa/tp1/memory/roundtrip")
    assert mqa.model.hf_config["num_key_value_heads"] == 1
    from harness.matrix.checkpoint_builder import checkpoint_digest

    assert checkpoint_digest(mqa.model) != checkpoint_digest(cases.get("llama@sq/tp1/memory/roundtrip").model)


@pytest.mark.parametrize(
    "variants,field,words",
    [
        ("      x: {hiden_size: 96}", "matrix[0].variants.x", "hiden_size: not a field of LlamaConfig"),
        ("      x: {num_key_value_heads: 3}", "matrix[0].variants.x", "does not divide num_attention_heads 4"),
        ("      x: {intermediate_size: -8}", "matrix[0].variants.x", "must be a positive integer"),
        ("      deep: {num_hidden_layers: 4}", "matrix[0].variants.deep", "clashes with the zoo variant"),
        ("      Bad Name: {num_hidden_layers: 4}", "matrix[0].variants.Bad Name", "expected a name"),
    ],
)
def test_bad_overrides_name_file_and_field(tmp_path, variants, field, words):
    d = write(tmp_path, VARIANT_ENTRY.format(variants=variants), name="sweep.yaml")
    with pytest.raises(CaseFileError) as err:
        load_cases(d)
    assert "sweep.yaml" in str(err.value) and field in str(err.value) and words in str(err.value)


def test_expected_invalid_layouts_are_kept_with_their_rule_and_never_run(tmp_path, case_set):
    d = write(tmp_path, "matrix:\n  - families: [llama]\n    layouts: [tp1-pp4]\n    paths: [memory/roundtrip]\n    expect: invalid\n")
    (case,) = load_cases(d).cases
    assert "layers 2 not divisible by pp4" in case.invalid_reason
    (tmp_path / "b").mkdir()
    d2 = write(tmp_path / "b", "matrix:\n  - families: [llama]\n    layouts: [tp1]\n    paths: [memory/roundtrip]\n    expect: invalid\n")
    with pytest.raises(CaseFileError, match="is valid, but the entry expects it to be refused"):
        load_cases(d2)
    sweep = [c for c in case_set.cases if c.invalid_reason]
    assert sweep and all("not divisible by pp" in c.invalid_reason or "Megatron-FSDP's device mesh has no pipeline"
                         in c.invalid_reason for c in sweep)


def test_a_layout_megatron_fsdp_refuses_is_invalid_only_for_fsdp_dtensor(tmp_path):
    entry = "matrix:\n  - families: [llama]\n    layouts: [tp1-pp2-dp2]\n    paths: [{path}]\n{expect}"
    (case,) = load_cases(write(tmp_path, entry.format(path="fsdp_dtensor/roundtrip", expect="    expect: invalid\n"))).cases
    assert "pp2: Megatron-FSDP's device mesh has no pipeline dimension" in case.invalid_reason
    (tmp_path / "b").mkdir()
    (case,) = load_cases(write(tmp_path / "b", entry.format(path="memory/roundtrip", expect=""))).cases
    assert not case.invalid_reason


def test_invalid_cases_are_reported_not_launched(tmp_path):
    from harness.execution import rank_launcher
    from harness.matrix.cases import load_cases as load
    from harness.run_spec import RunSpec

    d = write(tmp_path, "matrix:\n  - families: [llama]\n    layouts: [tp1-pp4]\n    paths: [memory/roundtrip]\n    expect: invalid\n")
    results = rank_launcher.run_cases(RunSpec(cases=load(d).cases, cases_dir=d), tmp_path / "run")
    assert [r.status for r in results] == ["invalid"] and "pp4" in results[0].error
    assert not (tmp_path / "run" / "logs").exists(), "nothing should have been launched"


def test_the_sweep_covers_the_shape_classes(case_set):
    cfgs = {c.model.id: c.model.hf_config for c in case_set.cases}
    assert any(c["num_attention_heads"] == c["num_key_value_heads"] for c in cfgs.values())  # MHA
    assert any(c["num_key_value_heads"] == 1 for c in cfgs.values())  # MQA
    assert any(c["num_attention_heads"] > c["num_key_value_heads"] > 1 for c in cfgs.values())  # GQA
    assert any(c.get("head_dim") and c["head_dim"] != c["hidden_size"] // c["num_attention_heads"] for c in cfgs.values())
    assert any(c["vocab_size"] % 2 for c in cfgs.values())  # odd vocab
    assert any(c.get("intermediate_size") == c["hidden_size"] for c in cfgs.values())  # square
    assert any(c.get("intermediate_size") and 2 * c["intermediate_size"] == c["hidden_size"] for c in cfgs.values())
    assert any(c.get("moe_intermediate_size") == c["hidden_size"] for c in cfgs.values())
    assert any(c.get("num_hidden_layers") == 1 for c in cfgs.values()) and any(c.get("num_hidden_layers", 0) > 2 for c in cfgs.values())


def test_the_checkpoint_inspector_case_needs_a_megatron_lm_tree_with_the_tool(tmp_path, monkeypatch, case_set):
    from harness.matrix import lanes

    case = case_set.get("llama@bf16/tp1/fsdp_dtensor/checkpoint-inspector")
    monkeypatch.delenv("HARNESS_MEGATRON_LM", raising=False)
    monkeypatch.delenv("HARNESS_MEGATRON_BRIDGE", raising=False)
    assert lanes.case_blocker(case, "cpu") == lanes.INSPECTOR_NEEDS_TREE and lanes.lanes_for(case) == ()
    monkeypatch.setenv("HARNESS_MEGATRON_LM", str(tmp_path))
    assert lanes.case_blocker(case, "cpu") == lanes.INSPECTOR_NEEDS_TREE  # a tree without the tool
    (tmp_path / lanes.CHECKPOINT_INSPECTOR).parent.mkdir(parents=True)
    (tmp_path / lanes.CHECKPOINT_INSPECTOR).write_text("")
    assert lanes.case_blocker(case, "cpu") == ""
    monkeypatch.delenv("HARNESS_MEGATRON_LM")
    tool = tmp_path / "bridge" / "3rdparty" / "Megatron-LM" / lanes.CHECKPOINT_INSPECTOR
    tool.parent.mkdir(parents=True)
    tool.write_text("")
    monkeypatch.setenv("HARNESS_MEGATRON_BRIDGE", str(tmp_path / "bridge"))  # a Bridge checkout's submodule
    assert lanes.megatron_lm_tool(lanes.CHECKPOINT_INSPECTOR) == tool


def test_the_converter_headline_is_its_rank_exception_not_torchruns():
    from harness.conversion.checkpoint_inspector import Conversion

    tail = ("[Convert] [18/18] Key: embedding.word_embeddings.weight\n"
            "[rank0]: Traceback (most recent call last):\n[rank0]:   File \"x.py\", line 1, in <module>\n"
            "[rank0]: megatron.core.dist_checkpointing.core.CheckpointingException: Common file /c/common.pt does not exist\n"
            "Traceback (most recent call last):\n  File \"torchrun\", line 8\n"
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")
    assert Conversion(1, tail).headline == (
        "megatron.core.dist_checkpointing.core.CheckpointingException: Common file /c/common.pt does not exist")
