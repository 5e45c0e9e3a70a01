"""The Orthanc Python plugin script (stdlib only; copied next to orthanc.json by ``medfinder orthanc config``)."""
