import pytest

from harness.matrix.layouts import Layout, LayoutError

pytestmark = pytest.mark.cpu

LLAMA = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2}
MOE = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "num_experts": 4}


@pytest.mark.parametrize("text", ["tp1", "tp2-pp2", "tp2-ep2", "tp1-pp2-vpp2", "tp2-ep2-etp1", "tp1-cp2"])
def test_parse_roundtrips_to_the_canonical_id(text):
    assert Layout.parse(text).id == text


def test_canonical_order_and_defaults():
    assert Layout.parse("ep2-tp2").id == "tp2-ep2"
    assert Layout.parse("pp1-tp1").id == "tp1"


@pytest.mark.parametrize("text", ["tp0", "xx2", "tp2-tp2", "pp", "tp1-vpp2"])
def test_bad_layout_text_is_refused(text):
    with pytest.raises(LayoutError):
        Layout.parse(text)


@pytest.mark.parametrize(
    "text,ws", [("tp1", 1), ("tp2", 2), ("tp2-pp2", 4), ("tp1-ep2", 2), ("tp2-ep2", 4), ("tp2-ep2-etp1", 2), ("tp2-ep4-etp1", 4), ("tp4-ep2-etp2", 4)]
)
def test_world_size(text, ws):
    assert Layout.parse(text).world_size == ws


@pytest.mark.parametrize(
    "text,cfg,rule",
    [
        ("tp8", LLAMA, "attention heads 4 not divisible by tp8"),
        ("tp1-pp4", LLAMA, "layers 2 not divisible by pp4"),
        ("tp1-pp2-vpp2", LLAMA, "layers 2 not divisible by pp2 x vpp2"),
        ("tp1-ep2", LLAMA, "has no experts"),
        ("tp1-ep8", MOE, "experts 4 not divisible by ep8"),
    ],
)
def test_violations_name_the_rule(text, cfg, rule):
    layout = Layout.parse(text)
    with pytest.raises(LayoutError, match=rule):
        layout.validate(cfg)


def test_valid_layouts_have_no_violations():
    assert Layout.parse("tp2-pp2").violations(LLAMA) == []
    assert Layout.parse("tp2-ep2").violations(MOE) == []
