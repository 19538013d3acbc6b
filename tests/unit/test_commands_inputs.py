"""The client commands' inputs and output names (clients/commands/inputs.py), on files in tmp_path."""
from __future__ import annotations

import pytest
import typer

from salf.cli import EXIT_USAGE, CliError
from clients.commands.inputs import claim_outputs, expand_inputs, folder_files, output_names, slug


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_folder_files_are_recursive_sorted_and_match_suffixes_in_any_case(tmp_path):
    b = _touch(tmp_path / "b.PNG")
    a = _touch(tmp_path / "sub" / "a.jpg")
    _touch(tmp_path / "notes.txt")
    (tmp_path / "dir.png").mkdir()  # a folder named like an image is not a file
    assert folder_files(tmp_path) == sorted([b, a])
    assert folder_files(tmp_path, (".txt",)) == [tmp_path / "notes.txt"]


def test_expand_inputs_keeps_files_as_given_and_replaces_folders_in_place(tmp_path):
    single = _touch(tmp_path / "z.webp")
    folder = tmp_path / "imgs"
    y, x = _touch(folder / "y.png"), _touch(folder / "deep" / "x.gif")
    assert expand_inputs([single, folder, single]) == [single, *sorted([y, x]), single]


def test_a_folder_without_images_is_a_usage_error(tmp_path):
    _touch(tmp_path / "empty" / "readme.md")
    with pytest.raises(typer.BadParameter, match=r"holds no \.jpg, \.jpeg"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(typer.BadParameter, match=r"holds no \.mp4 file"):
        expand_inputs([tmp_path / "empty"], (".mp4",))


def test_output_names_are_stems_when_they_are_distinct(tmp_path):
    a, b = _touch(tmp_path / "a" / "x.png"), _touch(tmp_path / "b" / "y.jpg")
    assert output_names([a, b]) == {a: "x", b: "y"}


def test_colliding_stems_are_named_by_their_path_from_the_common_folder(tmp_path):
    a, b = _touch(tmp_path / "a" / "x.png"), _touch(tmp_path / "b" / "c" / "x.png")
    assert output_names([a, b]) == {a: "a__x", b: "b__c__x"}


def test_same_stem_in_one_folder_keeps_the_suffix_and_repeats_are_numbered(tmp_path):
    png, jpg = _touch(tmp_path / "a.png"), _touch(tmp_path / "a.jpg")
    assert output_names([png, jpg]) == {png: "a", jpg: "a_jpg"}
    first, taken, last = _touch(tmp_path / "b.jpg"), _touch(tmp_path / "b_png.gif"), _touch(tmp_path / "b.png")
    assert output_names([first, taken, last]) == {first: "b", taken: "b_png", last: "b_png-2"}


def test_claim_outputs_makes_the_folder_and_refuses_existing_files_unless_forced(tmp_path):
    out = tmp_path / "out" / "figures"
    names = {tmp_path / f"{k}.png": k for k in "abcde"}
    claim_outputs(out, names, (".png", ".npz"), force=False)
    assert out.is_dir()
    for k in "abcd":
        _touch(out / f"{k}.png")
    with pytest.raises(CliError) as err:
        claim_outputs(out, names, (".png", ".npz"), force=False)
    assert err.value.code == EXIT_USAGE
    assert str(err.value) == (f"{out / 'a.png'}, {out / 'b.png'}, {out / 'c.png'} and 1 more already exist(s): "
                              "pass --force to overwrite, or choose another --out")
    claim_outputs(out, names, (".png",), force=True)  # forced: no error
    claim_outputs(out, names, (".npz",), force=False)  # other suffixes are free


def test_slug_makes_a_file_name_part_of_a_concept_name():
    assert slug("red stripes / wavy") == "red_stripes_wavy"
    assert slug("fur-texture.v2") == "fur-texture.v2"
    assert slug("??") == "concept"
