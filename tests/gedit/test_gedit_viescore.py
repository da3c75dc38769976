"""VIEScore as GEdit-Bench runs it: the prompts, reading the judge's answers, one edit's three numbers,
and the statistics table's arithmetic against hand-computed values. No model is loaded here."""

from __future__ import annotations

import csv
import hashlib
import math

import pytest
from PIL import Image

from step1x_core.gedit.dataset import TASK_TYPES, GEditSample
from step1x_core.gedit.stats import AVERAGE, official_folder, statistics, write_official_csvs, write_tables
from step1x_core.gedit.viescore import parse_scores, pq_prompt, sc_prompt, score_edit
from step1x_core.testing.gedit_data import ScriptedJudge

# sha256 of the official prompts (stepfun-ai/Step1X-Edit GEdit-Bench/viescore: "\n".join of
# _context_no_delimit with _prompts_0shot_two_image_edit_rule and _prompts_0shot_tie_rule_SC, and of
# _context_no_delimit with _prompts_0shot_rule_PQ), computed from that repository's text.
OFFICIAL_SC = "8f529562c2f89f8db51a3f7cc4d487686f676909c21010b67b0e65ec78150de5"
OFFICIAL_PQ = "2473ff2c7406e06545c5c039ceb039ff2604ebacf150868a48f0bf07c9e733b0"


def test_the_prompts_are_the_official_ones_word_for_word():
    assert hashlib.sha256(sc_prompt("<instruction>").encode()).hexdigest() == OFFICIAL_SC
    assert hashlib.sha256(pq_prompt().encode()).hexdigest() == OFFICIAL_PQ
    filled = sc_prompt("add a hat")
    assert filled.endswith("Editing instruction: add a hat\n") and "<instruction>" not in filled


@pytest.mark.parametrize("answer, scores", [
    ('||V^=^V||\n{\n"score" : [8, 6],\n"reasoning" : "ok"\n}\n||V^=^V||', [8, 6]),
    ('Sure.\n{\n"score" : [7, 9],\n"reasoning" : "the hat is there"\n}', [7, 9]),
    ('```json\n{"score": [5, 8], "reasoning": "fine"}\n```', [5, 8]),
    ('{"score": 4, "reasoning": "one number"}', [4]),
    ("{score: 6, reasoning: a bare number}", [6]),  # the official repair of almost-JSON
    ("{score: [10, 3], reasoning: a list}", None),  # beyond that repair, as in the official code
    ("[6, 0]", [6, 0]),  # a bare list of two scores
    ("The scores are [6,2].", [6, 2]),
    ("7", [7]),  # a bare score
    (" 10\n", [10]),
    ("11", None),  # out of range as a bare number
    ("[6, 0, 3]", None),  # a bare list only counts with two scores
    ("I cannot evaluate these images.", None),
    ('{"reasoning": "no score key"}', None),
    ('{"score": [], "reasoning": "empty"}', None),
    ('{"score": ["high", "low"]}', None),
    ('{"score": [true, 5]}', None),
    ("||V^=^V|| only one delimiter and no json", None),
    ("千古ߚ课本_i🄽 } prejud {", None),  # gibberish with braces
])
def test_answers_are_read_by_the_official_rules(answer, scores):
    assert parse_scores(answer) == scores


def _picture(size, colour=(90, 120, 150)):
    return Image.new("RGB", size, colour)


def test_one_edit_min_of_each_list_and_their_geometric_mean():
    judge = ScriptedJudge(lambda prompt, images: "[8, 5]" if "Editing instruction" in prompt else "[9, 7]")
    verdict = score_edit(judge, _picture((40, 30)), _picture((64, 48)).convert("RGBA"), "add a hat")
    assert (verdict.status, verdict.sc_scores, verdict.pq_scores) == ("ok", [8, 5], [9, 7])
    assert (verdict.SC, verdict.PQ) == (5, 7) and verdict.O == pytest.approx(math.sqrt(35))
    (sc, sc_sizes), (pq, pq_sizes) = judge.asked
    assert sc == sc_prompt("add a hat") and pq == pq_prompt()
    assert sc_sizes == [(40, 30), (40, 30)] and pq_sizes == [(40, 30)]  # the edit at the source's size


def test_an_unreadable_answer_is_asked_again_once_then_recorded_as_a_parse_failure():
    answers = iter(["no idea", "[6, 4]", "still no idea", "nothing"])
    judge = ScriptedJudge(lambda prompt, images: next(answers))
    verdict = score_edit(judge, _picture((16, 16)), _picture((16, 16)), "x")
    assert verdict.status == "parse_failure" and (verdict.SC, verdict.PQ, verdict.O) == (None, None, None)
    assert verdict.sc_scores == [6, 4] and verdict.pq_scores is None  # SC read at its second ask
    assert verdict.answers == {"SC": ["no idea", "[6, 4]"], "PQ": ["still no idea", "nothing"]}


def _sample(task, language, key, intersection):
    return GEditSample(task, key, "x", language, b"", b"", intersection)


def test_statistics_arithmetic_by_hand(tmp_path):
    samples = [
        _sample("color_alter", "en", "k1", True), _sample("color_alter", "en", "k2", False),
        _sample("background_change", "en", "k3", True), _sample("background_change", "en", "k4", False),
        _sample("background_change", "cn", "k3", False),
    ]
    verdicts = {
        samples[0].item_id: {"status": "ok", "SC": 8, "PQ": 2, "O": 4.0},
        samples[1].item_id: {"status": "ok", "SC": 6, "PQ": 8, "O": math.sqrt(48)},
        samples[2].item_id: {"status": "ok", "SC": 9, "PQ": 4, "O": 6.0},
        samples[3].item_id: {"status": "parse_failure", "SC": None, "PQ": None, "O": None},
        # samples[4] was never scored (no edit, or the judge failed)
    }
    rows = {(r.language, r.subset, r.task_type): r for r in statistics(samples, verdicts)}
    # The official order: languages en then cn; task types in GEdit-Bench's order, then the average.
    assert list(rows) == [("en", "fullset", "background_change"), ("en", "fullset", "color_alter"),
                          ("en", "fullset", AVERAGE), ("en", "intersection", "background_change"),
                          ("en", "intersection", "color_alter"), ("en", "intersection", AVERAGE),
                          ("cn", "fullset", "background_change"), ("cn", "fullset", AVERAGE)]
    color = rows[("en", "fullset", "color_alter")]
    assert (color.scored, color.unscored, color.SC, color.PQ) == (2, 0, 7.0, 5.0)
    assert color.O == pytest.approx((4 + 6.928203230275509) / 2)  # mean of per-sample O, not sqrt(7 * 5)
    background = rows[("en", "fullset", "background_change")]
    assert (background.scored, background.unscored, background.SC, background.PQ, background.O) == (1, 1, 9, 4, 6)
    average = rows[("en", "fullset", AVERAGE)]
    assert (average.scored, average.unscored) == (3, 1)
    assert (average.SC, average.PQ) == (8.0, 4.5)  # (7 + 9) / 2 and (5 + 4) / 2: task types weigh the same
    assert average.O == pytest.approx((5.464101615137754 + 6) / 2)
    inter = rows[("en", "intersection", AVERAGE)]
    assert (inter.SC, inter.PQ, inter.O, inter.scored) == ((8 + 9) / 2, (2 + 4) / 2, (4 + 6) / 2, 2)
    cn = rows[("cn", "fullset", "background_change")]
    assert (cn.scored, cn.unscored) == (0, 1) and math.isnan(cn.SC) and math.isnan(rows[("cn", "fullset", AVERAGE)].O)
    assert ("cn", "intersection", AVERAGE) not in rows  # no cn sample is in the intersection subset

    csv_path, md_path = write_tables(list(rows.values()), tmp_path, "scripted")
    table = list(csv.DictReader(csv_path.open(encoding="utf-8")))
    assert table[0].keys() == {"language", "subset", "task_type", "scored", "unscored", "SC", "PQ", "O"}
    by_key = {(r["language"], r["subset"], r["task_type"]): r for r in table}
    assert float(by_key[("en", "fullset", AVERAGE)]["O"]) == pytest.approx(5.732050807568877)
    assert by_key[("cn", "fullset", "background_change")]["SC"] == ""
    markdown = md_path.read_text(encoding="utf-8")
    assert "| **average** | 3 | 1 | 8.000 | 4.500 | 5.732 |" in markdown
    assert "| background_change | 0 | 1 | – | – | – |" in markdown and "## en, intersection subset" in markdown


def _official_statistics(folder, model, language, groups):
    """What the official calculate_statistics.py computes from its per-task-type files, for ``groups``:
    per group the means of sementics_score, quality_score and sqrt(their product) over the rows of that
    language (and over those with intersection_exist), then the mean over the groups."""
    pandas = pytest.importorskip("pandas")
    table = {}
    for subset in ("fullset", "intersection"):
        for group in groups:
            df = pandas.read_csv(folder / f"{model}_{group}_gpt_score.csv")
            rows = [r for _, r in df.iterrows() if r["instruction_language"] == language
                    and (subset == "fullset" or r["intersection_exist"])]
            sc = [r["sementics_score"] for r in rows]
            pq = [r["quality_score"] for r in rows]
            o = [math.sqrt(a * b) for a, b in zip(sc, pq)]
            table[(subset, group)] = tuple(sum(v) / len(v) if v else math.nan for v in (sc, pq, o))
        table[(subset, AVERAGE)] = tuple(sum(table[(subset, g)][i] for g in groups) / len(groups) for i in range(3))
    return table


def test_official_per_task_type_files_give_the_same_statistics(tmp_path):
    samples = [
        _sample("color_alter", "en", "k1", True), _sample("color_alter", "en", "k2", False),
        _sample("background_change", "en", "k3", True), _sample("background_change", "en", "k4", False),
        _sample("background_change", "cn", "k3", False), _sample("color_alter", "cn", "k1", True),
    ]
    verdicts = {
        samples[0].item_id: {"status": "ok", "SC": 8, "PQ": 2, "O": 4.0},
        samples[1].item_id: {"status": "ok", "SC": 6, "PQ": 8, "O": math.sqrt(48)},
        samples[2].item_id: {"status": "ok", "SC": 9, "PQ": 4, "O": 6.0},
        samples[3].item_id: {"status": "parse_failure", "SC": None, "PQ": None, "O": None},
        samples[4].item_id: {"status": "ok", "SC": 3, "PQ": 3, "O": 3.0},
        samples[5].item_id: {"status": "ok", "SC": 5, "PQ": 5, "O": 5.0},
    }
    folder = official_folder(tmp_path / "viescore" / "scripted", "mymodel", "qwen25vl")
    assert folder == tmp_path / "viescore" / "scripted" / "mymodel" / "qwen25vl" / "eval_results_new"
    paths = write_official_csvs(samples, verdicts, tmp_path, folder, "mymodel")
    assert [p.name for p in paths] == [f"mymodel_{t}_gpt_score.csv" for t in TASK_TYPES]  # all 11, as it opens each
    with paths[TASK_TYPES.index("color_alter")].open(encoding="utf-8") as f:
        lines = list(csv.DictReader(f))
    assert tuple(lines[0]) == ("source_image", "edited_image", "instruction", "sementics_score", "quality_score",
                               "intersection_exist", "instruction_language")
    assert [(r["sementics_score"], r["quality_score"], r["intersection_exist"], r["instruction_language"])
            for r in lines] == [("8", "2", "True", "en"), ("6", "8", "False", "en"), ("5", "5", "True", "cn")]
    assert lines[0]["edited_image"] == str(samples[0].edited_path(tmp_path))
    assert paths[0].read_text(encoding="utf-8").count("\n") == 1 + 2  # background_change: the parse failure left out
    ours = {(r.language, r.subset, r.task_type): r for r in statistics(samples, verdicts)}
    groups = ("background_change", "color_alter")
    for language in ("en", "cn"):
        official = _official_statistics(folder, "mymodel", language, groups)
        for (subset, task_type), scores in official.items():
            row = ours.get((language, subset, task_type))
            complete = all(ours.get((language, subset, g)) and ours[(language, subset, g)].scored for g in groups)
            if task_type == AVERAGE and not complete:
                # We average over the task types with a score; the official mean is NaN then.
                assert all(math.isnan(v) for v in scores)
            elif row is None or not row.scored:
                assert all(math.isnan(v) for v in scores), (language, subset, task_type)
            else:
                assert scores == pytest.approx((row.SC, row.PQ, row.O)), (language, subset, task_type)
    assert _official_statistics(folder, "mymodel", "en", groups)[("fullset", AVERAGE)] == \
        pytest.approx((ours[("en", "fullset", AVERAGE)].SC, ours[("en", "fullset", AVERAGE)].PQ,
                       ours[("en", "fullset", AVERAGE)].O))
