"""The command line's flags: one spelling per meaning in every command, old spellings kept for one release."""
import argparse
import inspect
import re
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest

from conftest import make_images
from similar_finder import cli

COMMANDS = ("extract", "cluster", "recommend", "evaluate", "adapt", "duplicates", "projector", "run-all", "app")

# command and its required arguments, the new spelling, the old one, and where the value lands
RENAMED = [
    (["extract", "photos"], ["--features-file", "f.csv"], ["--out", "f.csv"], "features_file", "f.csv"),
    (["cluster"], ["--clusters", "4"], ["--k", "4"], "clusters", 4),
    (["cluster"], ["--clusters-file", "c.csv"], ["--clusters", "c.csv"], "clusters_file", "c.csv"),
    (["evaluate", "db"], ["--results", "7"], ["-k", "7"], "results", 7),
    (["evaluate", "db"], ["-n", "7"], ["-k", "7"], "results", 7),
    (["adapt", "db"], ["--adapter", "a.keras"], ["--out", "a.keras"], "adapter", "a.keras"),
    (["duplicates", "photos"], ["--kind", "dhash"], ["--hash", "dhash"], "kind", "dhash"),
    (["run-all", "photos"], ["-n", "3"], ["--n-sample", "3"], "results", 3),
    (["run-all", "photos"], ["--results", "3"], ["--n-sample", "3"], "results", 3),
    (["app", "photos"], ["--features-file", "f.csv"], ["--features", "f.csv"], "features_file", "f.csv"),
]


def parse(argv):
    args = vars(cli.build_parser().parse_args(argv))
    args.pop("_deprecated", None)  # the record of notes already given
    return args


def options(parser):
    """Each command's sub-parser and its actions that are current spellings (help and old spellings left out)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        yield name, sub, [a for a in sub._actions if a.option_strings and not isinstance(a, (argparse._HelpAction,
                                                                                             cli._Renamed))]


@pytest.mark.parametrize("command, new, old, dest, value", RENAMED, ids=[f"{c[0]} {o[0]}" for c, _, o, *_ in RENAMED])
def test_the_old_spelling_parses_to_what_the_new_one_does_with_one_note(command, new, old, dest, value, capsys):
    current = parse(command + new)
    assert current[dest] == value
    assert "deprecated" not in capsys.readouterr().err  # the new spelling says nothing
    assert parse(command + old) == current  # the same value, and nothing else changes
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.count("deprecated") == 1
    assert err.startswith("warning: ") and re.search(rf"{re.escape(old[0])}\b.* is deprecated; use ", err)


def test_the_note_names_the_new_spelling_and_comes_once_however_often_the_old_one_is_given(capsys):
    assert parse(["run-all", "--n-sample", "3", "--n-sample", "4"])["results"] == 4
    assert capsys.readouterr().err == "warning: --n-sample is deprecated; use -n/--results\n"
    assert parse(["duplicates", "d", "--hash", "ahash", "--hash", "ahash"])["kind"] == "ahash"
    assert capsys.readouterr().err == "warning: --hash is deprecated; use --kind\n"


def test_an_old_spelling_gets_the_new_ones_checks(capsys):
    for argv in (["duplicates", "d", "--hash", "cnn"], ["cluster", "--k", "four"], ["run-all", "--n-sample", "x"]):
        with pytest.raises(SystemExit) as stop:
            cli.build_parser().parse_args(argv)
        assert stop.value.code == 2
    assert "invalid choice: 'cnn'" in capsys.readouterr().err  # --kind of duplicates: the hash kinds only


def test_cluster_clusters_is_a_number_and_a_file_only_for_one_more_release(capsys):
    fixed = parse(["cluster", "--clusters", "4"])
    assert fixed["clusters"] == 4 and fixed["clusters_file"] == "data/clusters.csv"
    assert capsys.readouterr().err == ""
    old = parse(["cluster", "--clusters", "out/c.csv"])
    assert old["clusters"] is None and old["clusters_file"] == "out/c.csv"  # k still chosen by silhouette
    assert capsys.readouterr().err.startswith("warning: --clusters FILE is deprecated; use --clusters-file")
    both = parse(["cluster", "--clusters", "out/c.csv", "--clusters", "3"])
    assert (both["clusters"], both["clusters_file"]) == (3, "out/c.csv")


def knots(parser):
    """What each option string means across the commands, and the options that mean two things or are spelled two ways.

    An option's meaning is where its value lands (``dest``) and what kind of value it names (``metavar``).
    """
    meaning = defaultdict(set)  # option string -> {(dest, metavar)}
    spelling = defaultdict(set)  # dest -> {option strings}
    where = defaultdict(set)
    for name, _, actions in options(parser):
        for action in actions:
            spelling[action.dest].add(tuple(action.option_strings))
            for option in action.option_strings:
                meaning[option].add((action.dest, action.metavar))
                where[option].add(name)
    clashes = {option: (found, sorted(where[option])) for option, found in meaning.items() if len(found) > 1}
    several = {dest: found for dest, found in spelling.items() if len(found) > 1}
    return meaning, where, clashes, several


def test_the_guard_finds_a_knot():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    commands.add_parser("a").add_argument("--out", metavar="DIR")
    commands.add_parser("b").add_argument("--out", dest="features_file", metavar="CSV")
    commands.add_parser("c").add_argument("-n", dest="results")
    commands.add_parser("d").add_argument("--n-sample", dest="results")
    _, _, clashes, several = knots(parser)
    assert set(clashes) == {"--out"} and set(several) == {"results"}


def test_one_option_string_means_one_thing_in_every_command():
    """The guard: an option string always lands in one dest with one kind of value, and a dest is spelled one way."""
    meaning, where, clashes, several = knots(cli.build_parser())
    assert not clashes, f"one option, several meanings: {clashes}"
    assert not several, f"one meaning, several spellings: {several}"
    # the spellings the issue asked for
    assert meaning["-n"] == meaning["--results"] == {("results", "N")}
    assert meaning["--clusters"] == {("clusters", "K")}
    assert meaning["--features-file"] == {("features_file", "CSV")}
    assert meaning["--adapter"] == {("adapter", "FILE")}
    assert {dest for dest, _ in meaning["--kind"]} == {"kind"}
    assert not {"-k", "--k", "--hash", "--n-sample", "--features"} & set(meaning)
    assert where["-n"] >= {"recommend", "evaluate", "run-all"}


def test_out_is_a_folder_everywhere():
    outs = {}
    for name, _, actions in options(cli.build_parser()):
        for action in actions:
            if "--out" in action.option_strings:
                outs[name] = action
    assert set(outs) == {"evaluate", "duplicates", "projector", "run-all"}
    for name, action in outs.items():
        assert action.metavar == "DIR" and action.help.startswith("folder for "), name
        assert action.default is None or "." not in action.default, name
    # where --out used to be a file, it is an old spelling of the file's own option
    assert parse(["extract", "p", "--out", "x/f.csv"])["features_file"] == "x/f.csv"
    assert parse(["adapt", "p", "--out", "x/a.keras"])["adapter"] == "x/a.keras"


def test_every_old_spelling_is_an_alias_of_an_option_of_its_command_and_named_in_its_help():
    old, helps = {}, {}
    for name, sub, actions in options(cli.build_parser()):
        helps[name] = sub.format_help().replace("\n", " ")
        dests = {a.dest for a in actions}
        for action in sub._actions:
            if isinstance(action, cli._Renamed):
                (spelling,) = action.option_strings
                assert action.dest in dests and action.default is argparse.SUPPRESS, (name, spelling)
                assert f"{spelling} (now {action.use})" in helps[name], (name, spelling)
                assert not re.search(rf"\[{re.escape(spelling)}[ \]]", sub.format_usage()), (name, spelling)
                old[name, spelling] = action.dest
    assert old == {("extract", "--out"): "features_file", ("cluster", "--k"): "clusters",
                   ("evaluate", "-k"): "results", ("adapt", "--out"): "adapter", ("duplicates", "--hash"): "kind",
                   ("run-all", "--n-sample"): "results", ("app", "--features"): "features_file"}
    assert "--clusters FILE (now --clusters-file)" in helps["cluster"]  # the one old spelling that is a new one


def test_features_file_has_one_default_and_each_exception_says_why():
    for name, _, actions in options(cli.build_parser()):
        for action in actions:
            if action.dest == "features_file":
                if action.default is None:
                    assert name in {"evaluate", "adapt", "app"}
                    assert re.search(r"default: data/\w+/<folder>\.csv, not data/features\.csv: \w", action.help), name
                else:
                    assert action.default == "data/features.csv", name


def _capture(monkeypatch, command, name):
    """Replace the function ``command`` (a ``cli._command``) imports as ``name`` and return what it was called with."""
    module = re.search(rf"from \.([\w.]+) import [\w, ]*\b{name}\b", inspect.getsource(command)).group(1)
    calls = []
    monkeypatch.setattr(f"similar_finder.{module}.{name}", lambda *a, **k: calls.append((a, k)) or object())
    return calls


def test_the_commands_pass_the_new_dests_on(monkeypatch):
    calls = _capture(monkeypatch, cli._run_all, "run_all")
    with pytest.raises(AttributeError):  # the fake answers nothing the command can print: the call is what counts
        cli.main(["run-all", "p", "-n", "3", "--out", "o", "--quiet"])
    assert calls[0][1]["n_sample"] == 3 and calls[0][1]["out"] == "o"

    calls = _capture(monkeypatch, cli._cluster, "fit_baseline")
    with pytest.raises(AttributeError):
        cli.main(["cluster", "--clusters", "4", "--clusters-file", "c.csv"])
    assert calls[0][1]["k"] == 4 and calls[0][1]["clusters_csv"] == "c.csv"

    calls = _capture(monkeypatch, cli._adapt, "adapt")
    with pytest.raises(AttributeError):
        cli.main(["adapt", "db", "--adapter", "a.keras", "--quiet"])
    assert calls[0][0][1] == "a.keras" and "adapter" not in calls[0][1]  # the file written, not embedded through

    calls = _capture(monkeypatch, cli._evaluate, "evaluate")
    with pytest.raises(AttributeError):
        cli.main(["evaluate", "db", "--results", "7", "--quiet"])
    assert calls[0][1]["k"] == 7


def test_duplicates_writes_into_the_out_folder_with_the_hash_kind(tmp_path, capsys):
    photos = make_images(tmp_path / "photos", 3)
    shutil.copy(photos[0], tmp_path / "photos" / "copy.jpg")
    assert cli.main(["duplicates", str(tmp_path / "photos"), "--kind", "dhash", "--out", str(tmp_path / "dup")]) == 0
    assert (tmp_path / "dup" / "duplicates.csv").is_file() and "1 groups, 2 images" in capsys.readouterr().out


def test_help_stays_fast_and_imports_no_tensorflow():
    every_help = ("import sys; from similar_finder import cli; p = cli.build_parser(); p.format_help(); "
                  "[s.format_help() for s in p._subparsers._group_actions[0].choices.values()]; "
                  "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'torch')))")
    assert subprocess.run([sys.executable, "-c", every_help], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
    timed = subprocess.run([sys.executable, "-X", "importtime", "-m", "similar_finder", "extract", "--help"],
                           capture_output=True, text=True)
    assert timed.returncode == 0 and "--features-file" in timed.stdout
    assert timed.stderr.count("tensorflow") == 0


def readme_commands():
    """Every ``similar-finder ...`` command line the README shows, in code blocks and inline."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    text = text.replace("\\\n", "")  # bash joins a continued line
    lines = re.findall(r"^similar-finder (.+)$", text, re.M) + re.findall(r"`similar-finder ([^`]+)`", text)
    return [shlex.split(re.sub(r"[][]", "", line), comments=True) for line in lines]  # [--optional] shown as such


def test_the_readme_shows_only_current_spellings(capsys):
    commands = readme_commands()
    assert {argv[0] for argv in commands} >= set(COMMANDS)
    for argv in commands:
        cli.build_parser().parse_args(argv)
        assert capsys.readouterr().err == "", argv
