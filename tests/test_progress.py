"""The training progress line while the shuffle buffer fills: the time left, by hand."""

from gsae.train import fill_status


def test_the_fill_line_gives_the_time_left_at_the_rate_so_far():
    # 4,096 of 16,384 rows in 60 s: 12,288 rows left at 68.3 rows/s is 180 s
    assert fill_status(4096, 16384, 60.0) == ("filling the shuffle buffer: 4096/16384, "
                                              "about 180 s left")
    assert fill_status(0, 16384, 5.0) == "filling the shuffle buffer: 0/16384"


def test_cache_stops_at_the_batch_that_reaches_the_count(corpus, tmp_path, capsys):
    from gsae.cli import main

    args = ["cache", "--model", "tiny-llama", "--dataset", corpus, "--context_size", "32",
            "--hooks", "0", "--lm_batch_size", "2", "--batches_per_shard", "8",
            "--outlier_factor", "0", "--store", str(tmp_path / "s")]
    assert main([*args, "--tokens", "100"]) == 0
    out = capsys.readouterr()
    # 30 rows per context (positions 1..30 of 32), 60 per batch: 100 tokens take 2 batches
    assert "stored 120 tokens" in out.out
    assert "20 tokens more than --tokens 100" in out.err and "--lm_batch_size 2" in out.err
