package engine

// sendStatsIfChanged is the idle loop's report: the counters only when
// they changed since the last report. An idle worker that reported every
// interval woke the gateway's ring reader ten times a second, and every
// wake-up set the gateway's Go runtime polling for a millisecond or two:
// about 2% of a core on an idle gateway (docs/BENCHMARKS.md). Liveness
// does not need the frame; the heartbeat counter in the shared segment,
// beaten on every pass of the loop, carries it.
func (w *workerLoop) sendStatsIfChanged() error {
	w.stats.Active = uint32(len(w.byID))
	if w.stats == w.sentStats {
		return nil
	}
	return w.sendStats()
}
