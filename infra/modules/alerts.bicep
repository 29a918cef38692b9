// Seed 003's alerts, all to one action group whose receivers are a parameter:
//   - sync failure rate above 10% of jobs (the handler's sync_jobs_failed / sync_jobs_processed);
//   - more than 100 pending jobs (Service Bus's own count of active messages in the sync queues);
//   - any token refresh failure (token_refresh_failures);
//   - more than 10 dead letters: the broker's dead-letter subqueues (DeadletteredMessages) and
//     the poison-message copies the handler keeps in sync-deadletter (its active messages).

param env string
param location string
param tags object
@description('[{ name: string, emailAddress: string }]')
param emailReceivers array
param appInsightsId string
param serviceBusNamespaceId string

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = {
  name: 'ag-sync-${env}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'sync-${env}'
    enabled: true
    emailReceivers: [for receiver in emailReceivers: {
      name: receiver.name
      emailAddress: receiver.emailAddress
      useCommonAlertSchema: true
    }]
  }
}

// Log alerts over the metrics the handler exports to Application Insights (customMetrics:
// one row per export interval and series, the interval's sum in valueSum).
var logAlerts = [
  {
    name: 'sync-failure-rate'
    description: 'More than 10% of sync jobs failed in the last 15 minutes.'
    severity: 0
    query: '''
customMetrics
| where name in ('sync_jobs_processed', 'sync_jobs_failed')
| summarize processed = sumif(valueSum, name == 'sync_jobs_processed'), failed = sumif(valueSum, name == 'sync_jobs_failed')
| where processed > 0 and failed / processed > 0.1
'''
  }
  {
    name: 'token-refresh-failures'
    description: 'A token refresh failed: an integration may need new credentials.'
    severity: 1
    query: '''
customMetrics
| where name == 'token_refresh_failures'
| summarize failures = sum(valueSum)
| where failures > 0
'''
  }
]

resource logAlert 'Microsoft.Insights/scheduledQueryRules@2023-03-15-preview' = [for alert in logAlerts: {
  name: 'alert-${alert.name}-${env}'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: '${alert.name} (${env})'
    description: alert.description
    severity: alert.severity
    enabled: true
    scopes: [
      appInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: alert.query
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    actions: {
      actionGroups: [
        actionGroup.id
      ]
    }
  }
}]

// Metric alerts on the namespace's platform metrics, per queue.
var metricAlerts = [
  {
    name: 'pending-jobs'
    description: 'More than 100 jobs wait in a sync queue.'
    severity: 2
    metric: 'ActiveMessages'
    entities: [
      'sync-inbound-webhook'
      'sync-inbound-scheduled'
      'sync-outbound'
    ]
    threshold: 100
  }
  {
    name: 'dead-letters'
    description: 'More than 10 messages in a queue\'s dead-letter subqueue.'
    severity: 2
    metric: 'DeadletteredMessages'
    entities: [
      '*'
    ]
    threshold: 10
  }
  {
    name: 'poison-messages'
    description: 'More than 10 poison messages copied to sync-deadletter.'
    severity: 2
    metric: 'ActiveMessages'
    entities: [
      'sync-deadletter'
    ]
    threshold: 10
  }
]

resource metricAlert 'Microsoft.Insights/metricAlerts@2018-03-01' = [for alert in metricAlerts: {
  name: 'alert-${alert.name}-${env}'
  location: 'global'
  tags: tags
  properties: {
    description: alert.description
    severity: alert.severity
    enabled: true
    scopes: [
      serviceBusNamespaceId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      'odata.type': 'Microsoft.Azure.Monitor.SingleResourceMultipleMetricCriteria'
      allOf: [
        {
          criterionType: 'StaticThresholdCriterion'
          name: alert.metric
          metricNamespace: 'Microsoft.ServiceBus/namespaces'
          metricName: alert.metric
          dimensions: [
            {
              name: 'EntityName'
              operator: 'Include'
              values: alert.entities
            }
          ]
          operator: 'GreaterThan'
          threshold: alert.threshold
          timeAggregation: 'Maximum'
        }
      ]
    }
    actions: [
      {
        actionGroupId: actionGroup.id
      }
    ]
  }
}]
