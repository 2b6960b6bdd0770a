"""summary.md says when the method's own choice (MBR@N) scores below random@N or greedy and what to try next (the
issue's first run: MBR@8 EM 0.0 vs random 1.0 vs greedy 8.3); the plots' y-axis fits the data (not a fixed 0-100
that squashes every line under 21%) and coinciding lines stay visible (widest drawn first, own markers)."""

import copy
import types

from sealong.evaluate.report import LINE_STYLES, advice_markdown, evaluate, fitted_ylim, plot_vs_n


def _result(mbr_em, random_em, greedy_em, n=8):
    def record(i, k, text):
        return {"id": f"q{i}", "outputs": [text] * k, "answers": ["paris"], "dataset": "all", "num_tokens": [4] * k,
                "finish_reasons": ["stop"] * k}

    greedy = [record(i, 1, "The answer is paris.") for i in range(12)]
    sampled = [record(i, n, "The answer is rome.") for i in range(12)]
    result = evaluate(greedy, sampled, ns=[n], mbr=False)
    avg = result["average"]
    avg[f"MBR@{n}"] = dict(copy.deepcopy(avg[f"random@{n}"]), em=mbr_em, subem=mbr_em)
    avg[f"random@{n}"].update(em=random_em, subem=random_em)
    avg["greedy"].update(em=greedy_em, subem=greedy_em)
    avg[f"oracle@{n}"].update(em=20.8, subem=20.8)
    return result


def test_mbr_below_random_and_greedy_is_pointed_out_with_what_to_try():
    text = advice_markdown({"before": _result(0.0, 1.0, 8.3)}, 8, demo=True)
    assert "**MBR@8 is below random@8** (EM 0.0 vs 1.0; SubEM 0.0 vs 1.0)" in text
    assert "**MBR@8 is below greedy** (EM 0.0 vs 8.3" in text
    assert "`sealong pipeline --preset demo-gain`" in text and "`--num-samples`" in text and "`--temperature`" in text
    assert "no better than chance" in text
    assert advice_markdown({"before": _result(9.0, 1.0, 8.3)}, 8, demo=True) == ""
    above_chance = advice_markdown({"before": _result(5.0, 1.0, 8.3)}, 8)  # the measured demo-gain run's case
    assert "**MBR@8 is below greedy**" in above_chance and "below random" not in above_chance
    assert "beats a random sample but not the model's greedy answer" in above_chance
    assert "no better than chance" not in above_chance


def test_pipeline_summary_carries_the_advice(tmp_path):
    import sealong.pipeline as pipeline

    before = _result(0.0, 1.0, 8.3)
    r = types.SimpleNamespace(args=types.SimpleNamespace(eval_samples=8, rounds=1, model=None), run=tmp_path,
                              preset="demo", configs={"train": types.SimpleNamespace(mode="orpo"),
                                                      "sample": types.SimpleNamespace(num_samples=8)})
    text = pipeline.summary(r, before, None, [])
    assert "## What this run says" in text and "MBR@8 is below random@8" in text


def test_plot_y_axis_fits_the_data_and_lines_stay_visible(tmp_path):
    before, after = _result(0.0, 1.0, 8.3), _result(4.0, 2.0, 10.0)
    lo, hi = plot_vs_n({"before": before, "after": after}, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert lo == 0.0 and 20.8 < hi < 30  # every value (0 .. 20.8) inside, not a 0-100 axis
    assert fitted_ylim([50.0, 50.0]) == (45.0, 55.0) and fitted_ylim([99.0]) == (90.0, 100.0)
    widths = [style["linewidth"] for _, style in LINE_STYLES]
    orders = [style["zorder"] for _, style in LINE_STYLES]
    assert widths == sorted(widths, reverse=True) and orders == sorted(orders)
    assert len({style["marker"] for _, style in LINE_STYLES}) == 3
