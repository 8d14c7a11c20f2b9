"""mine_pairs: related-note pairs from view→click co-occurrence in user event logs."""
