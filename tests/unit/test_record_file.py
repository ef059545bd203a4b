"""Records under .snapfs/ are read and rewritten by worker threads at once (an inbox is
claimed and answered concurrently): no update may be lost, through one open file or two."""

import threading

from snapfs.chain.leases import RecordFile


def bump_concurrently(files, rounds: int) -> None:
    def work(f):
        for _ in range(rounds):
            f.update(lambda rec: rec.__setitem__("n", rec.get("n", 0) + 1))
    threads = [threading.Thread(target=work, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_threads_sharing_one_record_file_lose_no_update(tmp_path):
    f = RecordFile(str(tmp_path / "rec"))
    bump_concurrently([f] * 4, 200)
    assert f.read() == {"n": 800}
    f.close()


def test_separate_opens_of_one_record_lose_no_update(tmp_path):
    files = [RecordFile(str(tmp_path / "rec")) for _ in range(4)]
    bump_concurrently(files, 200)
    assert files[0].read() == {"n": 800}
    for f in files:
        f.close()
