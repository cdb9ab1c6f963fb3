"""What every layer shares and none owns: the error hierarchy, sizes, names, crash-safe
writes and waiting for processes. Imports nothing else of lhfs."""
