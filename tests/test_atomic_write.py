"""skyloom.atomic_write: a file is either the old one or the whole new one, never a mix."""

import pytest

from skyloom.atomic_write import write_atomic, write_atomic_with


def test_write_atomic_writes_text_and_bytes(tmp_path):
    assert write_atomic(tmp_path / "a.txt", "héllo\n").read_bytes() == "héllo\n".encode()
    assert write_atomic(tmp_path / "a.txt", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_writer_given_a_file_name_fills_the_target(tmp_path):
    def write(temporary):
        assert temporary.parent == tmp_path and temporary.name.startswith(".out.bin.") and temporary.stat().st_size == 0
        temporary.write_bytes(b"data")

    assert write_atomic_with(tmp_path / "out.bin", write).read_bytes() == b"data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, error):
    target = write_atomic(tmp_path / "out.bin", b"old")

    def fail_half_way(temporary):
        temporary.write_bytes(b"ne")
        raise error

    with pytest.raises(type(error)):
        write_atomic_with(target, fail_half_way)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
