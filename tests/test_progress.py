"""Progress bars draw on a terminal only: a log or a pipe gets no bar and no blank lines."""
from tfuse.progress import track


def test_a_bar_leaves_nothing_in_a_pipe(capfd):
    assert list(track(range(5), "work", total=5)) == list(range(5))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
