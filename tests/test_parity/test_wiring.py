"""Wiring bugs: every module computes what it should, yet the stage fails. `--locate` names the
first module whose input (in the port's free run) differs from the reference's recorded input
while everything before it was within bounds, or the stage output a difference enters after
the last module, and says what transformation of the reference's tensor it is."""
from __future__ import annotations

import json

import pytest

import wiring_bugs
from conftest import REPO_ROOT

GOLDEN = REPO_ROOT / "fixtures" / "golden" / "tiny-default"

# bug: (the stage it fails, what the headline says after "FAIL at stage '<stage>'")
EXPECTED = {
    "clip_l_last_layer": ("conditioner", ": the stage's prompt_embeds[..., 0:32] (CLIP-L) differs "
                          "from the reference's: equal to the reference's output of module "
                          "'text_model.encoder.layers.2' (text_model.encoder.layers.2)"),
    "big_g_pooled_last": ("conditioner", ": the stage's pooled_prompt_embeds differs from the "
                          "reference's: equal to the reference's final hidden state of bigG at "
                          "position(s) [76], projected (the pooled row taken there, not at the "
                          "EOS token)"),
    "skip_concat_order": ("unet", ", step 0: the input of module 'output_blocks.0.0' "
                          "(up_blocks.0.resnets.0) differs from the reference's: its two halves "
                          "along axis 1 swapped"),
    "vae_scale_multiplied": ("decode", ": the input of module 'post_quant_conv' "
                             "(post_quant_conv) differs from the reference's: scaled by "
                             "0.0169651 (0.13025^2)"),
    "crossattn_big_g_first": ("conditioner", ": the stage's prompt_embeds differs from the "
                              "reference's: its first 32 and last 64 entries along axis 2 "
                              "swapped (concatenated in the other order)"),
    "proj_out_transposed": ("unet", ", step 0, module 'input_blocks.4.1' (down_blocks.1."
                            "attentions.0): own rel_l2 1.09 > fail 7e-06; inside it, the input "
                            "of module 'input_blocks.4.1.proj_out' (down_blocks.1.attentions.0."
                            "proj_out) differs from the reference's: transposed in its last two "
                            "axes and reshaped back to its shape"),
}


def _check(tmp_path, capsys):
    from parity.cli import main

    code = main(["check", "--golden", str(GOLDEN), "--out", str(tmp_path / "r"), "--quiet",
                 "--locate"])
    out = capsys.readouterr().out
    return code, out.splitlines()[0], json.loads((tmp_path / "r" / "report.json").read_text())


@pytest.mark.parametrize("bug", list(wiring_bugs.BUGS))
def test_a_wiring_bug_is_named_at_its_first_divergent_input_and_classified(
        bug, tmp_path, capsys, monkeypatch):
    wiring_bugs.inject(bug, monkeypatch.setattr)
    stage, says = EXPECTED[bug]
    code, headline, report = _check(tmp_path, capsys)
    assert code == 1
    assert headline.startswith(f"FAIL at stage '{stage}'{says}"), headline
    loc = report["localisation"][0]
    assert loc["stage"] == stage and loc["divergence"]["rel_l2"] > 0.1


def test_the_unmutated_port_names_no_divergence(tmp_path, capsys):
    """Every stage passes, so nothing is localised by check; locate run on its own names none."""
    from parity.cli import main

    code = main(["locate", "--golden", str(REPO_ROOT / "fixtures" / "golden" / "tiny-locate"),
                 "--out", str(tmp_path / "l"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "l" / "report.json").read_text())
    assert [loc.get("divergence") for loc in report["localisation"]] == [None, None, None]
