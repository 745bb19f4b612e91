"""Process 0's verdict over the job's signs of life (`multihost.verdict_of`),
with the clock and the key-value store's values written out by hand."""

from deeplab_jax import multihost

ALIVE = 'deeplab_jax/alive/'


def _judge(rounds, count=3, hang_s=100.0):
  """Feeds `[(time, {process: value})]` to `verdict_of`; returns the verdict
  of every round."""
  multihost.set_hang_timeout(hang_s)
  seen = {p: (None, 0.0, None, 0.0) for p in range(count)}
  out = []
  for now, values in rounds:
    keyed = {f'{ALIVE}{p}': v for p, v in values.items()}
    out.append(multihost.verdict_of(keyed, seen, now, count))
  multihost.set_hang_timeout(multihost.DEFAULT_HANG_TIMEOUT_S)
  return out


def test_beating_peers_at_one_step_are_well_even_for_long():
  # A long compile or checkpoint write: every process at step 5, beating.
  rounds = [
    (t, {0: f'{t}|5', 1: f'{t}|5', 2: f'{t}|5'}) for t in range(0, 400, 2)
  ]
  assert set(_judge(rounds)) == {None}


def test_a_silent_peer_is_lost_after_the_peer_timeout():
  # Process 2's value is first seen at t=2 and never changes again.
  timeout = multihost.PEER_TIMEOUT_S
  rounds = [(t, {0: f'{t}|1', 1: f'{t}|1', 2: '3|1'}) for t in (2, 4)]
  rounds += [(2 + timeout, {0: 'x|1', 1: 'y|1', 2: '3|1'})]  # exactly 30 s
  rounds += [(3 + timeout, {0: 'x2|1', 1: 'y2|1', 2: '3|1'})]
  verdicts = _judge(rounds)
  assert verdicts[:3] == [None, None, None]
  assert verdicts[3] == (f'lost|process 2 sent no sign of life for {timeout} s')


def test_a_peer_behind_the_others_hangs_after_the_bound():
  # Process 1 stays at step 2 while 0 and 2 reach step 3 and wait there.
  rounds = [(0, {0: '1|2', 1: '1|2', 2: '1|2'})]
  rounds += [(t, {0: f'{t}|3', 1: f'{t}|2', 2: f'{t}|3'}) for t in (2, 50, 101)]
  verdicts = _judge(rounds, hang_s=100.0)
  assert verdicts[:3] == [None, None, None]
  assert verdicts[3] == (
    'stop|process 1 at step 3 made no progress for 100 s while the others '
    'wait at step 4 (train.hang_timeout_s): it hangs (a stalled file system, '
    'a stuck input pipeline); every process stops. Restart every process '
    'with the same command; the run resumes from its last checkpoint'
  )


def test_finished_peers_and_stop_requests():
  # A finished peer's silence is not a death; a stop request is everyone's.
  timeout = multihost.PEER_TIMEOUT_S
  rounds = [(0, {0: '1|9', 1: 'done', 2: '1|9'})]
  rounds += [(timeout + 5, {0: '2|9', 1: 'done', 2: '2|9'})]
  rounds += [(timeout + 7, {0: '3|9', 1: 'done', 2: 'stop|the lock was lost'})]
  assert _judge(rounds) == [None, None, 'stop|the lock was lost']


def test_a_peer_behind_while_busy_is_not_hung():
  # Process 1 compiles (or evaluates, or writes a checkpoint) far longer
  # than the bound while the others wait at the next step; once it is back
  # at its steps, the bound counts from then.
  rounds = [(t, {0: f'{t}|1|', 1: f'{t}|0|compiling'}) for t in (0, 2, 300)]
  rounds += [(t, {0: f'{t}|1|', 1: f'{t}|0|'}) for t in (302, 400, 403)]
  verdicts = _judge(rounds, count=2, hang_s=100.0)
  assert verdicts[:5] == [None] * 5
  assert verdicts[5].startswith('stop|process 1 at step 1 made no progress')
