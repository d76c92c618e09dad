"""The simulator: real firmware under the MicroPython unix port, citizens, faults, province."""
