# Debug aid for device runs: `kill -USR1 <pid>` dumps every thread's Python stack to stderr, and
# E8_FAULTHANDLER_AFTER=<s> dumps them (then exits) after s seconds.
import faulthandler
import os
import signal

faulthandler.register(signal.SIGUSR1, all_threads=True)
if os.environ.get("E8_FAULTHANDLER_AFTER"):
    faulthandler.dump_traceback_later(float(os.environ["E8_FAULTHANDLER_AFTER"]), exit=True)
