"""midiforge."""
