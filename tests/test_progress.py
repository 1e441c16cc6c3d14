"""The training progress line while the shuffle buffer fills: the time left, by hand."""

from gsae.train import fill_status


def test_the_fill_line_gives_the_time_left_at_the_rate_so_far():
    # 4,096 of 16,384 rows in 60 s: 12,288 rows left at 68.3 rows/s is 180 s
    assert fill_status(4096, 16384, 60.0) == ("filling the shuffle buffer: 4096/16384, "
                                              "about 180 s left")
    assert fill_status(0, 16384, 5.0) == "filling the shuffle buffer: 0/16384"
