# A stand-in for the ESP32 port's `network` module: a station that associates after
# `join_after` isconnected() polls (None: never).
STA_IF = 0
join_after = [3]


class WLAN:
    def __init__(self, iface):
        self.iface = iface
        self.on = False
        self.joined = False
        self.polls = 0
        self.ssid = None

    def active(self, on=None):
        if on is None:
            return self.on
        self.on = bool(on)
        return None

    def connect(self, ssid, password):
        if not self.on:
            raise OSError("wifi not active")
        self.ssid = ssid
        self.polls = 0

    def isconnected(self):
        if self.ssid is not None and not self.joined:
            self.polls += 1
            if join_after[0] is not None and self.polls > join_after[0]:
                self.joined = True
        return self.joined

    def status(self, param=None):
        if param == "rssi":
            return -61
        return 1010 if self.joined else 1001
