"""What every layer shares and nothing else: the call record, the OpenAI-shaped error, credentials and header values, time formatting. Imports nothing else of meterproxy."""
