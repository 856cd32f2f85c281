"""`python -m appliance.agent`: the standalone agent (locations from locations.yaml)."""

from appliance.agent.run import main

if __name__ == "__main__":
    main()
