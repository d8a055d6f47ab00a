"""Operations: the fleet status report, the configuration report, the metrics."""
